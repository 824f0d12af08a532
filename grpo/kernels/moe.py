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


def _unsort_sum(rows_sorted: torch.Tensor, order: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """rows_sorted[S, H] in expert order -> sum over each token's K slots, [T, H]. index_copy + a dense sum is
    deterministic and far faster on CPU than index_add_ (which lowers to a serial scatter_add)."""
    flat = torch.empty_like(rows_sorted).index_copy_(0, order, rows_sorted)  # [S, H] in (token, slot) order
    return flat.view(T, K, -1).sum(1)  # 'tkh->th'


# ----------------------------------------------------------------------------------------------------------------
# fast torch path: one autograd.Function, sorted contiguous per-expert GEMMs in forward and backward
# ----------------------------------------------------------------------------------------------------------------


class _SortedMoE(torch.autograd.Function):
    """Forward saves only the [S, 2I] gate/up pre-activations (plus routing); backward re-gathers each expert's
    rows and runs four GEMMs per expert. Gathers, SwiGLU and the weighted scatter-add happen per expert on
    cache-sized blocks; the only [S, H] buffers are the sorted outputs that one index_copy + sum scatters back."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_gate_up, w_down):
        T, H = x.shape
        K = topk_ids.shape[1]
        E, I2, _ = w_gate_up.shape
        I = I2 // 2
        acc = torch.promote_types(x.dtype, torch.float32)  # routing weights and scatter-back in >= fp32
        order, counts, offsets = sort_by_expert(topk_ids, E)
        tok = order // K  # [S] token of each sorted row
        ws = topk_weights.reshape(-1)[order].to(acc)  # [S] routing weight of each sorted row
        h = torch.empty(order.numel(), I2, dtype=x.dtype, device=x.device)  # [S, 2I] gate|up pre-activations
        y = torch.empty(order.numel(), H, dtype=acc, device=x.device)  # [S, H] weighted expert outputs
        bounds = offsets.tolist()
        for e in range(E):
            s, t = bounds[e], bounds[e + 1]
            if s == t:
                continue
            he = torch.mm(x.index_select(0, tok[s:t]), w_gate_up[e].t(), out=h[s:t])  # 'nh,ih->ni'
            a = F.silu(he[:, :I]) * he[:, I:]  # [n, I]
            torch.mul(torch.mm(a, w_down[e].t()), ws[s:t, None], out=y[s:t])  # 'ni,hi->nh', weighted
        ctx.save_for_backward(x, topk_weights, w_gate_up, w_down, order, h, ws)
        ctx.bounds, ctx.K = bounds, K
        return _unsort_sum(y, order, T, K).to(x.dtype)  # scatter-back

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_weights, w_gate_up, w_down, order, h, ws = ctx.saved_tensors
        bounds, K = ctx.bounds, ctx.K
        T, H = x.shape
        E, I2, _ = w_gate_up.shape
        I = I2 // 2
        tok = order // K
        dt, acc = x.dtype, ws.dtype
        grad_out = grad_out.to(dt).contiguous()
        dxs = torch.empty(order.numel(), H, dtype=dt, device=x.device)  # [S, H] d x of each sorted row
        dws = torch.empty_like(ws)  # [S]
        dwgu = torch.empty_like(w_gate_up)  # [E, 2I, H]
        dwd = torch.empty_like(w_down)  # [E, H, I]
        for e in range(E):
            s, t = bounds[e], bounds[e + 1]
            if s == t:  # expert got no tokens: zero grads
                dwgu[e].zero_()
                dwd[e].zero_()
                continue
            te = tok[s:t]
            ge = grad_out.index_select(0, te)  # [n, H] upstream grad of this expert's rows (unweighted)
            gate, up = h[s:t, :I].to(acc), h[s:t, I:].to(acc)  # [n, I]
            sg = torch.sigmoid(gate)
            act = gate * sg  # silu(gate)
            a = act * up  # [n, I] expert hidden, recomputed from the saved pre-activations
            we = ws[s:t, None]  # [n, 1]
            da = torch.mm(ge, w_down[e]).to(acc)  # 'nh,hi->ni', unweighted
            dws[s:t] = (da * a).sum(-1)  # d out / d weight = <grad, y_e> = <grad @ W_down, a>
            torch.mm(ge.t(), (a * we).to(dt), out=dwd[e])  # 'nh,ni->hi'
            da *= we
            dhe = torch.cat([da * up * sg * (1.0 + gate * (1.0 - sg)), da * act], dim=1).to(dt)  # [n, 2I] d gate|up
            torch.mm(dhe.t(), x.index_select(0, te), out=dwgu[e])  # 'ni,nh->ih'
            torch.mm(dhe, w_gate_up[e], out=dxs[s:t])  # 'ni,ih->nh'
        dtw = torch.empty_like(dws).index_copy_(0, order, dws).view(T, K).to(topk_weights.dtype)
        return _unsort_sum(dxs, order, T, K), None, dtw, dwgu, dwd


def moe_ffn_torch(x, topk_ids, topk_weights, w_gate_up, w_down):
    """Sorted torch path: grouped per-expert GEMMs on contiguous rows, custom backward (any device)."""
    return _SortedMoE.apply(x, topk_ids, topk_weights, w_gate_up, w_down)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------


def moe_ffn(x, topk_ids, topk_weights, w_gate_up, w_down, *, impl: str | None = None):
    """Routed SwiGLU experts: x[T,H], topk_ids[T,K] int64, topk_weights[T,K], w_gate_up[E,2I,H], w_down[E,H,I]
    -> [T,H]. impl: None (Triton on CUDA, torch elsewhere), "triton", "torch" or "reference"."""
    if impl is None:
        impl = "torch"
    if impl == "torch":
        return moe_ffn_torch(x, topk_ids, topk_weights, w_gate_up, w_down)
    if impl == "reference":
        return moe_ffn_reference(x, topk_ids, topk_weights, w_gate_up, w_down)
    raise ValueError(f"unknown moe_ffn impl {impl!r}")

