"""Fused linear log-prob + entropy: log softmax(hidden @ weight.T / temperature)[target] and the entropy of that
distribution, without ever materialising the [N, V] logits, in forward or backward.

Both passes stream over vocab chunks of `chunk_size` columns. Forward keeps an online logsumexp per row
(running max m, running sum s = sum exp(z - m), running t = sum exp(z - m) * z, and the target logit), so
lse = m + log s, logp = z_target - lse, entropy = lse - t / s. Backward recomputes each chunk's logits and
forms dz = g_logp * (onehot - p) - g_ent * p * (z - E_p[z]) for that chunk only, then dhidden += dz @ W_c and
dweight[c] = dz.T @ hidden. Peak extra memory is O(N * chunk_size), not O(N * V).
Entropy is differentiable (not detached). Targets < 0 (e.g. -100) are ignored: logp = 0 there and no grad.
Dispatch: on CUDA the per-chunk softmax bookkeeping runs in Triton kernels (the chunk GEMMs stay in cuBLAS, as in
Liger's fused linear cross-entropy); elsewhere it runs in torch ops. Logits and softmax maths are fp32.
"""

from __future__ import annotations

import torch

try:  # triton is optional: CPU installs run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def logprob_reference(hidden, weight, targets, temperature: float = 1.0):
    """Plain-torch reference: full [N, V] logits, log_softmax, gather; entropy = -sum p log p."""
    logits = (hidden @ weight.T).float() / temperature  # 'nh,vh->nv'
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = targets >= 0
    logp = logprobs.gather(1, targets.clamp_min(0)[:, None])[:, 0] * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------------
# per-chunk softmax bookkeeping: torch ops (any device) and Triton kernels (CUDA, or CPU under TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------------------------


def _fwd_chunk_torch(z, targets, v0, inv_temp, m, s, t, zt):
    """Fold logits chunk z[N, C] (raw matmul output) into the running row stats m, s, t, zt (in place)."""
    z = z.float()
    if inv_temp != 1.0:
        z = z.mul_(inv_temp)
    m_new = torch.maximum(m, z.amax(1))
    scale = torch.exp(m - m_new)
    e = torch.sub(z, m_new[:, None]).exp_()  # [N, C]
    s.mul_(scale).add_(e.sum(1))
    t.mul_(scale).add_(torch.linalg.vecdot(e, z))  # 'nc,nc->n'
    m.copy_(m_new)
    local = targets - v0
    hit = (local >= 0) & (local < z.shape[1])
    zt.add_(torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0))


def _bwd_chunk_torch(z, targets, v0, inv_temp, lse, ez, g_logp, g_ent):
    """d loss / d (hidden @ W_c.T) for chunk z[N, C], returned in z.dtype (fp32 maths); g_ent None = unused."""
    zf = z.float()
    if inv_temp != 1.0:
        zf = zf.mul_(inv_temp)
    if g_ent is None:
        dz = torch.sub(zf, lse[:, None]).exp_().mul_(-g_logp[:, None])  # -g * p
    else:
        coef = torch.sub(zf, ez[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])
        dz = torch.sub(zf, lse[:, None]).exp_().mul_(coef).neg_()  # -p * (g + g_ent * (z - E_p[z]))
    local = targets - v0
    hit = (local >= 0) & (local < z.shape[1])
    rows = hit.nonzero()[:, 0]
    dz[rows, local[rows]] += g_logp[rows]
    if inv_temp != 1.0:
        dz = dz.mul_(inv_temp)
    return dz.to(z.dtype)


if triton is not None:

    @triton.jit
    def _fwd_chunk_kernel(z_ptr, stride_z, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, C, v0, inv_temp,
                          BLOCK: tl.constexpr):
        # one program per row: online logsumexp over the chunk's C columns, BLOCK at a time
        row = tl.program_id(0).to(tl.int64)
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        t = tl.load(t_ptr + row)
        zt = tl.load(zt_ptr + row)
        target = tl.load(tgt_ptr + row) - v0
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            s = s * scale + tl.sum(e, axis=0)
            t = t * scale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # e = 0 on masked columns
            zt += tl.sum(tl.where((cols == target) & mask, z, 0.0), axis=0)  # target may sit in the masked tail
            m = m_new
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(t_ptr + row, t)
        tl.store(zt_ptr + row, zt)

    @triton.jit
    def _bwd_chunk_kernel(z_ptr, stride_z, tgt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, C, v0, inv_temp,
                          BLOCK: tl.constexpr):
        # one program per row: overwrite the chunk's logits with d loss / d logits (already divided by T)
        row = tl.program_id(0).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        ez = tl.load(ez_ptr + row)
        glp = tl.load(glp_ptr + row)
        gent = tl.load(gent_ptr + row)
        target = tl.load(tgt_ptr + row) - v0
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            dz = -p * (glp + gent * (z - ez)) + tl.where((cols == target) & mask, glp, 0.0)
            tl.store(z_ptr + row * stride_z + cols, (dz * inv_temp).to(z_ptr.dtype.element_ty), mask=mask)


def _fwd_chunk_triton(z, targets, v0, inv_temp, m, s, t, zt):
    N, C = z.shape
    block = min(1024, triton.next_power_of_2(C))
    _fwd_chunk_kernel[(N,)](z, z.stride(0), targets, m, s, t, zt, C, v0, inv_temp, BLOCK=block)


def _bwd_chunk_triton(z, targets, v0, inv_temp, lse, ez, g_logp, g_ent):
    N, C = z.shape
    g_ent = torch.zeros_like(lse) if g_ent is None else g_ent
    block = min(1024, triton.next_power_of_2(C))
    _bwd_chunk_kernel[(N,)](z, z.stride(0), targets, lse, ez, g_logp, g_ent, C, v0, inv_temp, BLOCK=block)
    return z


# ----------------------------------------------------------------------------------------------------------------
# autograd: chunked GEMMs around the per-chunk bookkeeping
# ----------------------------------------------------------------------------------------------------------------


class _FusedLogprob(torch.autograd.Function):
    """Saves hidden, weight, targets and two fp32 row stats (lse, E_p[z]); recomputes logits chunk by chunk. The
    chunk GEMMs run in `dtype` (fused_logprob picks it) with autocast off, in forward and backward alike, and the
    gradients come back in the inputs' own dtypes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, use_triton, dtype):
        ctx.in_dtypes = hidden.dtype, weight.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # [N, H], [V, H]
        N, V = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        m = torch.full((N,), float("-inf"), **f32)
        s, t, zt = torch.zeros(N, **f32), torch.zeros(N, **f32), torch.zeros(N, **f32)
        fwd_chunk = _fwd_chunk_triton if use_triton else _fwd_chunk_torch
        inv_temp = 1.0 / temperature
        for v0 in range(0, V, chunk_size):
            z = hidden @ weight[v0 : v0 + chunk_size].T  # [N, C] 'nh,ch->nc'
            fwd_chunk(z, targets, v0, inv_temp, m, s, t, zt)
        lse = m + torch.log(s)
        ez = t / s  # E_p[z]
        valid = targets >= 0
        logp = torch.where(valid, zt - lse, 0.0)
        entropy = lse - ez
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.set_materialize_grads(False)  # an unused entropy arrives as None: its terms are skipped
        ctx.inv_temp, ctx.chunk_size, ctx.use_triton = inv_temp, chunk_size, use_triton
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        V = weight.shape[0]
        C = ctx.chunk_size
        g_logp = torch.zeros_like(lse) if g_logp is None else (g_logp.float() * (targets >= 0)).contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        bwd_chunk = _bwd_chunk_triton if ctx.use_triton else _bwd_chunk_torch
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.empty(weight.shape, dtype=ctx.in_dtypes[1], device=weight.device) if need_w else None
        # a backward run inside autocast (GRPO's loss.backward() under mixed_precision) would recast the GEMMs
        with torch.autocast(hidden.device.type, enabled=False):
            for v0 in range(0, V, C):
                w_c = weight[v0 : v0 + C]  # [C, H]
                dz = bwd_chunk(hidden @ w_c.T, targets, v0, ctx.inv_temp, lse, ez, g_logp, g_ent)  # [N, C]
                if need_h:
                    dh += (dz @ w_c).float()  # 'nc,ch->nh', accumulated over chunks in fp32
                if need_w:
                    if dw.dtype == dz.dtype:
                        torch.mm(dz.T, hidden, out=dw[v0 : v0 + C])  # 'nc,nh->ch'
                    else:
                        dw[v0 : v0 + C] = dz.T @ hidden
        return (dh.to(ctx.in_dtypes[0]) if need_h else None), dw, None, None, None, None, None


def fused_logprob(hidden, weight, targets, temperature: float = 1.0, chunk_size: int = 4096, *,
                  impl: str | None = None):
    """hidden[N,H], weight[V,H] (LM head), targets[N] int64 -> (logp[N], entropy[N]), both fp32 and
    differentiable, streamed over vocab chunks. impl: None (Triton on CUDA, torch elsewhere), "triton", "torch".
    The head GEMMs run in autocast's dtype inside an autocast region (as nn.Linear would), else in the inputs'."""
    if impl is None:
        impl = "triton" if (hidden.is_cuda and triton is not None) else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"unknown fused_logprob impl {impl!r}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
        else torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device, enabled=False):
        return _FusedLogprob.apply(hidden, weight, targets.contiguous(), float(temperature), int(chunk_size),
                                   impl == "triton", dtype)
