"""Routed-expert SwiGLU FFN for DeepSeekMoE: a plain-torch reference, a fast sorted torch path, a Triton path.

Layout matches transformers' DeepseekV3 experts (`DeepseekV3Experts`, 5.19):
  w_gate_up[E, 2I, H] holds [gate; up] stacked on dim 1, w_down[E, H, I];
  gate, up = (x @ w_gate_up[e].T).chunk(2, -1);  y_e = (silu(gate) * up) @ w_down[e].T;
  out[t] = sum_k topk_weights[t, k] * y_{topk_ids[t, k]}[t].
Both fast paths sort the T*K (token, slot) pairs by expert so that each expert's rows are contiguous, run one
GEMM per expert on those rows (grouped GEMM), and scatter the weighted rows back; neither loops over tokens in
Python. Dispatch: Triton on CUDA tensors (when triton imports), the sorted torch path elsewhere.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

try:  # triton is optional: CPU installs run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None


# ----------------------------------------------------------------------------------------------------------------
# reference: per-expert boolean masks, plain autograd (mirrors transformers' eager experts backend)
# ----------------------------------------------------------------------------------------------------------------


def moe_ffn_reference(x, topk_ids, topk_weights, w_gate_up, w_down):
    """Plain-torch reference: for each expert, pick its (token, slot) pairs with a mask and index_add them back."""
    T, H = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(T, H, dtype=acc, device=x.device)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(topk_ids == e)  # [n], [n]
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, w_down[e])  # [n, H]
        out = out.index_add(0, tok, y.to(acc) * topk_weights[tok, slot, None].to(acc))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# routing bookkeeping shared by both fast paths
# ----------------------------------------------------------------------------------------------------------------


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Sort the T*K flat (token, slot) pairs by expert: returns order[S] (flat slot ids), counts[E], offsets[E+1]."""
    flat = topk_ids.reshape(-1)  # [S = T*K]
    order = torch.argsort(flat, stable=True)  # [S]: sorted position -> flat slot id
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))  # [E+1]
    return order, counts, offsets


# ----------------------------------------------------------------------------------------------------------------
# fast torch path: one autograd.Function over sorted rows; grouped GEMMs via torch._grouped_mm or a per-expert loop
# ----------------------------------------------------------------------------------------------------------------


def _gmm_usable(*ts) -> bool:
    """torch._grouped_mm wants fp32/bf16 and 16-byte aligned pointers and strides; else we loop over experts."""
    if not hasattr(torch, "_grouped_mm") or ts[0].dtype not in (torch.float32, torch.bfloat16):
        return False
    for t in ts:
        size = t.element_size()
        if t.data_ptr() % 16 or any(st != 1 and st * size % 16 for st in t.stride()):
            return False
    return True


EXPERT_THREADS: int | None = None  # CPU threads for the expert-parallel GEMM loop; None = torch.get_num_threads()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool): a forked child makes its own


def _expert_parallel(fn, bounds, workers):
    """Run fn(e) for every expert with rows, split into `workers` contiguous expert ranges of about equal rows,
    each on its own thread (torch.mm releases the GIL). On CPU, independent single-stream GEMMs per thread beat
    one GEMM at a time split across threads, above all on a shared machine; every expert writes its own rows."""
    global _POOL
    E = len(bounds) - 1
    if workers <= 1:
        for e in range(E):
            if bounds[e + 1] > bounds[e]:
                fn(e)
        return
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1kit-moe"))
    cuts = [0] + [bisect.bisect_left(bounds, bounds[-1] * w / workers, 0, E) for w in range(1, workers)] + [E]

    def run(lo, hi):
        with torch.no_grad():  # worker threads start with grad mode on; out= GEMMs must not be recorded
            for e in range(lo, hi):
                if bounds[e + 1] > bounds[e]:
                    fn(e)

    for f in [_POOL[2].submit(run, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]:
        f.result()


def grouped_mm(a, b, offsets, bounds):
    """Per-expert GEMMs over sorted row groups (offsets[E+1] tensor, bounds the same as a list):
    b 3-D: 'sk,ekn->sn' (each row group times its expert's matrix); b 2-D: 'ks,sn->ekn' (a[:, group] @ b[group]).
    CPU with several threads: expert-parallel mm loop; else torch._grouped_mm when usable; else a plain loop."""
    workers = (EXPERT_THREADS or torch.get_num_threads()) if a.device.type == "cpu" else 1
    if workers <= 1 and _gmm_usable(a, b):
        try:
            return torch._grouped_mm(a, b, offs=offsets[1:].to(torch.int32))
        except (RuntimeError, NotImplementedError):  # e.g. a CUDA arch or dtype grouped_mm lacks
            pass
    E = len(bounds) - 1
    if b.dim() == 3:
        out = torch.empty(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
        _expert_parallel(lambda e: torch.mm(a[bounds[e] : bounds[e + 1]], b[e], out=out[bounds[e] : bounds[e + 1]]),
                         bounds, workers)
        return out
    out = torch.empty(E, a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    for e in range(E):
        if bounds[e + 1] == bounds[e]:
            out[e].zero_()  # an expert with no rows gets a zero gradient; the rest is overwritten below
    _expert_parallel(lambda e: torch.mm(a[:, bounds[e] : bounds[e + 1]], b[bounds[e] : bounds[e + 1]], out=out[e]),
                     bounds, workers)
    return out


class _SortedMoE(torch.autograd.Function):
    """Sorted-row MoE with a hand-written backward. The routing weight scales the [S, I] hidden before the down GEMM
    (w * (a @ Wd.T) = (w * a) @ Wd.T, half the bytes of scaling the [S, H] output). Saves only the [S, 2I] gate/up
    pre-activations and the routing; backward re-gathers x and runs four grouped GEMMs (da, dW_down, dW_gate_up,
    dx) with SwiGLU's backward in between. Rows return to their (token, slot) place by one index_copy and a dense
    sum over K: deterministic, and far faster on CPU than the serial scatter-add of index_add_ / index backward."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_gate_up, w_down):
        T, H = x.shape
        K = topk_ids.shape[1]
        E, I2, _ = w_gate_up.shape
        I = I2 // 2
        acc = torch.promote_types(x.dtype, torch.float32)  # SwiGLU, routing weights and the K-sum in >= fp32
        order, counts, offsets = sort_by_expert(topk_ids, E)
        bounds = offsets.tolist()
        tok = order // K  # [S] token of each sorted row
        ws = topk_weights.reshape(-1)[order].to(acc)[:, None]  # [S, 1] routing weight of each sorted row
        h = grouped_mm(x.index_select(0, tok), w_gate_up.transpose(1, 2), offsets, bounds)  # [S, 2I] 'sh,eih->si'
        aw = (F.silu(h[:, :I]) * h[:, I:]).mul_(ws).to(x.dtype)  # [S, I] expert hidden, routing weight folded in
        y = grouped_mm(aw, w_down.transpose(1, 2), offsets, bounds)  # [S, H] 'si,ehi->sh' = w * y_e
        out = torch.empty_like(y).index_copy_(0, order, y).view(T, K, H).sum(1, dtype=acc)  # 'tkh->th' scatter-back
        ctx.save_for_backward(x, topk_weights, w_gate_up, w_down, order, offsets, h, ws)
        ctx.bounds, ctx.K = bounds, K
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_weights, w_gate_up, w_down, order, offsets, h, ws = ctx.saved_tensors
        bounds, K = ctx.bounds, ctx.K
        T, H = x.shape
        I = h.shape[1] // 2
        tok = order // K
        dt, acc = x.dtype, ws.dtype
        gs = grad_out.to(dt).index_select(0, tok)  # [S, H] upstream grad of each sorted row (unweighted)
        da = grouped_mm(gs, w_down, offsets, bounds).to(acc)  # [S, I] 'sh,ehi->si'
        gate, up = h[:, :I].to(acc), h[:, I:].to(acc)
        act = F.silu(gate)
        a = act * up  # [S, I] expert hidden, recomputed from the saved pre-activations
        dws = torch.linalg.vecdot(da, a)  # [S] d out / d weight = <grad, y_e> = <grad @ W_down, a>
        dwd = grouped_mm(gs.t(), a.mul_(ws).to(dt), offsets, bounds)  # [E, H, I] 'hs,si->ehi'
        da.mul_(ws)
        dh = torch.empty(h.shape, dtype=acc, device=h.device)  # [S, 2I] d gate | d up
        torch.ops.aten.silu_backward.grad_input(da * up, gate, grad_input=dh[:, :I])
        torch.mul(da, act, out=dh[:, I:])
        dh = dh.to(dt)
        dwgu = grouped_mm(dh.t(), x.index_select(0, tok), offsets, bounds)  # [E, 2I, H] 'is,sh->eih'
        dxs = grouped_mm(dh, w_gate_up, offsets, bounds)  # [S, H] 'si,eih->sh'
        dx = torch.empty_like(dxs).index_copy_(0, order, dxs).view(T, K, H).sum(1, dtype=acc).to(dt)
        dtw = torch.empty_like(dws).index_copy_(0, order, dws).view(T, K).to(topk_weights.dtype)
        return dx, None, dtw, dwgu, dwd


def moe_ffn_torch(x, topk_ids, topk_weights, w_gate_up, w_down):
    """Sorted torch path: grouped GEMMs on expert-contiguous rows, custom backward (any device)."""
    return _SortedMoE.apply(x, topk_ids, topk_weights, w_gate_up, w_down)


# ----------------------------------------------------------------------------------------------------------------
# Triton path: align sorted rows to BM-row blocks (one expert per block), fused gate/up GEMM + SwiGLU, grouped GEMMs
# that gather rows by token and scatter them to (token, slot) positions, and per-expert weight-grad GEMMs
# ----------------------------------------------------------------------------------------------------------------


def align_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Pad each expert's sorted rows to a multiple of block_m. Returns slots[S_pad] (flat slot id, -1 = padding),
    block_expert[S_pad / block_m] and padded offsets[E+1]; all vectorised, no per-token Python."""
    order, counts, offsets = sort_by_expert(topk_ids, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    poffsets = F.pad(torch.cumsum(padded, 0), (1, 0))  # [E+1]
    expert_sorted = topk_ids.reshape(-1)[order]  # [S]
    pos = torch.arange(order.numel(), device=order.device) - offsets[expert_sorted] + poffsets[expert_sorted]
    slots = torch.full((int(poffsets[-1]),), -1, dtype=torch.int64, device=order.device)
    slots[pos] = order
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=order.device), padded // block_m)
    return slots, block_expert, poffsets


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(x_ptr, w_ptr, h_ptr, a_ptr, slot_ptr, bexp_ptr, H, I, K_top,
                           stride_xm, stride_we, stride_wn, stride_wk,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # rows p of one BM block (one expert e): h[p] = x[tok(p)] @ w_gate_up[e].T, a[p] = silu(gate) * up
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(bexp_ptr + pid_m).to(tl.int64)
        rp = pid_m * BM + tl.arange(0, BM)
        slot = tl.load(slot_ptr + rp)
        valid = slot >= 0
        tok = tl.where(valid, slot // K_top, 0)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < I
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
        w_base = w_ptr + e * stride_we
        for k0 in range(0, H, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < H
            xa = tl.load(x_ptr + tok[:, None] * stride_xm + rk[None, :], mask=valid[:, None] & kmask[None, :],
                         other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wg = tl.load(w_base + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=wmask, other=0.0)
            wu = tl.load(w_base + (rn[None, :] + I) * stride_wn + rk[:, None] * stride_wk, mask=wmask, other=0.0)
            acc_g = tl.dot(xa, wg, acc_g)  # [BM, BK] @ [BK, BN]
            acc_u = tl.dot(xa, wu, acc_u)
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        smask = nmask[None, :] & (rp[:, None] >= 0)
        tl.store(h_ptr + rp[:, None] * (2 * I) + rn[None, :], acc_g.to(h_ptr.dtype.element_ty), mask=smask)
        tl.store(h_ptr + rp[:, None] * (2 * I) + I + rn[None, :], acc_u.to(h_ptr.dtype.element_ty), mask=smask)
        tl.store(a_ptr + rp[:, None] * I + rn[None, :], act.to(a_ptr.dtype.element_ty), mask=smask)

    @triton.jit
    def _grouped_mm_kernel(a_ptr, b_ptr, c_ptr, slot_ptr, bexp_ptr, scale_ptr, N, KD, K_top,
                           stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm,
                           A_BY_TOKEN: tl.constexpr, C_BY_SLOT: tl.constexpr, HAS_SCALE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # C[rc(p)] = scale[p] * A[ra(p)] @ B[e] for rows p of one block; ra = token or p, rc = slot or p
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(bexp_ptr + pid_m).to(tl.int64)
        rp = pid_m * BM + tl.arange(0, BM)
        slot = tl.load(slot_ptr + rp)
        valid = slot >= 0
        if A_BY_TOKEN:
            ra = tl.where(valid, slot // K_top, 0)
        else:
            ra = rp
        if C_BY_SLOT:
            rc = tl.where(valid, slot, 0)
        else:
            rc = rp
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, KD, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < KD
            av = tl.load(a_ptr + ra[:, None] * stride_am + rk[None, :] * stride_ak,
                         mask=valid[:, None] & kmask[None, :], other=0.0)
            bv = tl.load(b_ptr + e * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                         mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(av, bv, acc)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rp)[:, None]
        tl.store(c_ptr + rc[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & nmask[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(a_ptr, b_ptr, c_ptr, slot_ptr, poff_ptr, scale_ptr, M, N, K_top,
                              stride_am, stride_bm, stride_ce, stride_cm,
                              A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, HAS_SCALE: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # C[e] = sum over expert e's rows r of (scale[r] * A[ra(r)])^T B[rb(r)]   ('rm,rn->mn')
        e = tl.program_id(0).to(tl.int64)
        pid_m, pid_n = tl.program_id(1), tl.program_id(2)
        start = tl.load(poff_ptr + e)
        end = tl.load(poff_ptr + e + 1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), tl.float32)
        for r0 in range(start, end, BK):
            rr = r0 + tl.arange(0, BK)
            slot = tl.load(slot_ptr + rr, mask=rr < end, other=-1)
            valid = slot >= 0
            tok = tl.where(valid, slot // K_top, 0)
            if A_BY_TOKEN:
                ra = tok
            else:
                ra = rr
            if B_BY_TOKEN:
                rb = tok
            else:
                rb = rr
            av = tl.load(a_ptr + ra[None, :] * stride_am + rm[:, None], mask=valid[None, :] & (rm[:, None] < M),
                         other=0.0)  # [BM, BK]
            bv = tl.load(b_ptr + rb[:, None] * stride_bm + rn[None, :], mask=valid[:, None] & (rn[None, :] < N),
                         other=0.0)  # [BK, BN]
            if HAS_SCALE:
                av = (av * tl.load(scale_ptr + rr, mask=rr < end, other=0.0)[None, :]).to(bv.dtype)
            acc = tl.dot(av, bv, acc)
        tl.store(c_ptr + e * stride_ce + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _grouped_mm(a, b, c, slots, bexp, scale, N, KD, K, stride_b, a_by_token, c_by_slot, bm, bn, bk):
    """Launch _grouped_mm_kernel; stride_b = (expert, k, n) strides of B viewed as [E, KD, N]."""
    grid = (bexp.numel(), triton.cdiv(N, bn))
    _grouped_mm_kernel[grid](a, b, c, slots, bexp, scale if scale is not None else slots, N, KD, K,
                             a.stride(0), a.stride(1), *stride_b, c.stride(0),
                             A_BY_TOKEN=a_by_token, C_BY_SLOT=c_by_slot, HAS_SCALE=scale is not None,
                             BM=bm, BN=bn, BK=bk)


def _grouped_wgrad(a, b, out, slots, poff, scale, K, a_by_token, b_by_token, bm, bn, bk):
    """Launch _grouped_wgrad_kernel: out[E, M, N] = per-expert A^T B over that expert's rows."""
    E, M, N = out.shape
    grid = (E, triton.cdiv(M, bm), triton.cdiv(N, bn))
    _grouped_wgrad_kernel[grid](a, b, out, slots, poff, scale if scale is not None else slots, M, N, K,
                                a.stride(0), b.stride(0), out.stride(0), out.stride(1),
                                A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, HAS_SCALE=scale is not None,
                                BM=bm, BN=bn, BK=bk)


class _TritonMoE(torch.autograd.Function):
    """Triton MoE; saves the padded [S_pad, 2I] pre-activations and the block routing tables."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_gate_up, w_down, bm, bn, bk):
        x = x.contiguous()
        T, H = x.shape
        K = topk_ids.shape[1]
        E, I2, _ = w_gate_up.shape
        I = I2 // 2
        slots, bexp, poff = align_blocks(topk_ids, E, bm)
        valid = slots >= 0
        acc = torch.promote_types(x.dtype, torch.float32)
        ws = torch.where(valid, topk_weights.reshape(-1)[slots.clamp_min(0)].to(acc), 0.0)  # [S_pad]
        h = torch.empty(slots.numel(), I2, dtype=x.dtype, device=x.device)  # [S_pad, 2I]
        a = torch.empty(slots.numel(), I, dtype=x.dtype, device=x.device)  # [S_pad, I]
        grid = (bexp.numel(), triton.cdiv(I, bn))
        _swiglu_fwd_kernel[grid](x, w_gate_up, h, a, slots, bexp, H, I, K, x.stride(0), *w_gate_up.stride(),
                                 BM=bm, BN=bn, BK=bk)
        y = torch.empty(T * K, H, dtype=acc, device=x.device)  # [S, H] weighted rows at their (token, slot)
        _grouped_mm(a, w_down, y, slots, bexp, ws, H, I, K, (w_down.stride(0), w_down.stride(2), w_down.stride(1)),
                    False, True, bm, bn, bk)
        ctx.save_for_backward(x, topk_weights, w_gate_up, w_down, slots, bexp, poff, ws, h)
        ctx.blocks = (bm, bn, bk)
        return y.view(T, K, H).sum(1).to(x.dtype)  # 'tkh->th' scatter-back

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_weights, w_gate_up, w_down, slots, bexp, poff, ws, h = ctx.saved_tensors
        bm, bn, bk = ctx.blocks
        T, H = x.shape
        K = topk_weights.shape[1]
        E, I2, _ = w_gate_up.shape
        I = I2 // 2
        g = grad_out.to(x.dtype).contiguous()
        da = torch.zeros(slots.numel(), I, dtype=x.dtype, device=x.device)  # [S_pad, I] unweighted g @ W_down
        _grouped_mm(g, w_down, da, slots, bexp, None, I, H, K, (w_down.stride(0), w_down.stride(1), w_down.stride(2)),
                    True, False, bm, bn, bk)
        gate, up = h[:, :I].to(ws.dtype), h[:, I:].to(ws.dtype)
        sg = torch.sigmoid(gate)
        act = gate * sg
        a = act * up  # [S_pad, I] recomputed expert hidden
        da = da.to(ws.dtype)
        dws = (da * a).sum(-1)  # [S_pad] grad of each routing weight
        da = da * ws[:, None]
        dh = torch.cat([da * up * sg * (1.0 + gate * (1.0 - sg)), da * act], dim=1).to(x.dtype)  # [S_pad, 2I]
        dwd = torch.empty_like(w_down)
        _grouped_wgrad(g, a.to(x.dtype), dwd, slots, poff, ws, K, True, False, bm, bn, bk)  # 'rh,ri->hi'
        dwgu = torch.empty_like(w_gate_up)
        _grouped_wgrad(dh, x, dwgu, slots, poff, None, K, False, True, bm, bn, bk)  # 'ri,rh->ih'
        dxs = torch.empty(T * K, H, dtype=ws.dtype, device=x.device)  # [S, H] at (token, slot) positions
        _grouped_mm(dh, w_gate_up, dxs, slots, bexp, None, H, I2, K,
                    (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2)), False, True, bm, bn, bk)
        valid = slots >= 0
        dtw = torch.zeros(T * K, dtype=ws.dtype, device=x.device)
        dtw[slots[valid]] = dws[valid]
        dx = dxs.view(T, K, H).sum(1).to(x.dtype)
        return dx, None, dtw.view(T, K).to(topk_weights.dtype), dwgu, dwd, None, None, None


def moe_ffn_triton(x, topk_ids, topk_weights, w_gate_up, w_down, block_m: int = 64, block_n: int = 64,
                   block_k: int = 32):
    """Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1); block sizes must be >= 16 for tl.dot."""
    if triton is None:
        raise RuntimeError("moe_ffn_triton needs triton")
    return _TritonMoE.apply(x, topk_ids, topk_weights, w_gate_up.contiguous(), w_down.contiguous(),
                            block_m, block_n, block_k)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------


def moe_ffn(x, topk_ids, topk_weights, w_gate_up, w_down, *, impl: str | None = None):
    """Routed SwiGLU experts: x[T,H], topk_ids[T,K] int64, topk_weights[T,K], w_gate_up[E,2I,H], w_down[E,H,I]
    -> [T,H]. impl: None (Triton on CUDA, torch elsewhere), "triton", "torch" or "reference"."""
    if impl is None:
        impl = "triton" if (x.is_cuda and triton is not None) else "torch"
    if impl == "triton":
        return moe_ffn_triton(x, topk_ids, topk_weights, w_gate_up, w_down)
    if impl == "torch":
        return moe_ffn_torch(x, topk_ids, topk_weights, w_gate_up, w_down)
    if impl == "reference":
        return moe_ffn_reference(x, topk_ids, topk_weights, w_gate_up, w_down)
    raise ValueError(f"unknown moe_ffn impl {impl!r}")

