"""Routed-expert SwiGLU FFN for DeepSeekMoE: a plain-torch reference, a fast sorted torch path, a Triton path.

Layout matches transformers' DeepseekV3 experts (`DeepseekV3Experts`, 5.19):
  w_gate_up[E, 2I, H] holds [gate; up] stacked on dim 1, w_down[E, H, I];
  gate, up = (x @ w_gate_up[e].T).chunk(2, -1);  y_e = (silu(gate) * up) @ w_down[e].T;
  out[t] = sum_k topk_weights[t, k] * y_{topk_ids[t, k]}[t].
Both fast paths sort the T*K (token, slot) pairs by expert so that each expert's rows are contiguous, run that
expert's GEMMs on its rows, and scatter the weighted rows back; neither loops over tokens in Python. The torch
path walks the experts (split over CPU threads; in fp32 each thread's whole expert loop is one compiled C call,
cpu_moe.py), the Triton path launches grouped GEMMs over row blocks.
Dispatch: Triton on CUDA tensors (when triton imports), the sorted torch path elsewhere.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from grpo.kernels import cpu_moe

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
# fast torch path: one autograd.Function; each expert's rows go gather -> GEMM -> SwiGLU -> GEMM -> scatter-add in
# one go, so its [n, 2I] / [n, H] intermediates stay in cache, and experts run in parallel on CPU threads
# ----------------------------------------------------------------------------------------------------------------


EXPERT_THREADS: int | None = None  # CPU threads for the expert loop; None = torch.get_num_threads()
# fp32 on CPU, where cpu_moe.py builds: "loop" runs each thread's expert loop as one C call (gathers, torch's own
# MKL sgemm, SwiGLU; threads take experts as they go); "swiglu" keeps the loop in Python with only SwiGLU in C;
# "off": torch ops throughout
CPU_C = "loop"
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool): a forked child makes its own


def _workers(x: torch.Tensor) -> int:
    """Threads for the expert loop: several on CPU (independent single-stream GEMMs per thread beat one GEMM at a
    time split across threads), one elsewhere (a GPU queues the kernels itself)."""
    return (EXPERT_THREADS or torch.get_num_threads()) if x.device.type == "cpu" else 1


def _c_kernels(x: torch.Tensor):
    """(lib, whole loop in C?) for x: the compiled library when x is fp32 on CPU, CPU_C allows it and it builds,
    else None (torch ops); the loop runs in C where torch's sgemm was found too."""
    on = CPU_C in ("loop", "swiglu") and x.device.type == "cpu" and x.dtype == torch.float32
    lib = cpu_moe.load() if on else None
    return lib, lib is not None and lib.sgemm is not None and CPU_C == "loop"


def _on_threads(fn, n: int) -> None:
    """Run fn(w) for w in range(n): w = 0 on the calling thread, the rest on a pool (torch ops and the C loop release
    the GIL), each with single-threaded torch ops (no OpenMP team per op on top of the n threads)."""
    global _POOL

    def run(w):
        if n > 1:
            torch.set_num_threads(1)
        with torch.no_grad():  # worker threads start with grad mode on; out= GEMMs must not be recorded
            fn(w)

    if n <= 1:
        run(0)
        return
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < n - 1:
        _POOL = (os.getpid(), n - 1, ThreadPoolExecutor(n - 1, thread_name_prefix="r1kit-moe"))
    threads = torch.get_num_threads()
    try:
        futures = [_POOL[2].submit(run, w) for w in range(1, n)]
        run(0)
        for f in futures:
            f.result()
    finally:  # restored once every thread is done (the setting may be process-wide)
        torch.set_num_threads(threads)


def _expert_parallel(expert, bounds: list[int], workers: int) -> int:
    """Split the experts into at most `workers` contiguous ranges of about equal rows; thread w calls expert(e, w)
    for each expert e with rows in range w. Returns the number of ranges."""
    E = len(bounds) - 1
    cuts = [0] + [bisect.bisect_left(bounds, bounds[-1] * w / workers, 0, E) for w in range(1, workers)] + [E]
    ranges = [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo] or [(0, E)]

    def run(w):
        for e in range(*ranges[w]):
            if bounds[e + 1] > bounds[e]:
                expert(e, w)

    _on_threads(run, len(ranges))
    return len(ranges)


def _combine(lib, rows, pos, workers: int) -> torch.Tensor:
    """[T, H] sums of each token's K rows (cpu_moe.combine), the tokens split over the threads."""
    T, out = pos.shape[0], rows.new_empty(pos.shape[0], rows.shape[1])
    _on_threads(lambda w: cpu_moe.combine(lib, rows, pos, out, T * w // workers, T * (w + 1) // workers), workers)
    return out


def _sum_buffers(bufs: list[torch.Tensor], n: int) -> torch.Tensor:
    """Sum of the first n per-thread accumulators (fixed order: deterministic for a given thread count)."""
    out = bufs[0]
    for b in bufs[1:n]:
        out += b
    return out


_silu_out = torch.ops.aten.silu.out  # silu into a given buffer (F.silu has no out=)
_silu_backward_out = torch.ops.aten.silu_backward.grad_input


class _SortedMoE(torch.autograd.Function):
    """Sorted-row MoE with a hand-written backward. Rows are sorted by expert; per expert, forward gathers its
    tokens, runs the gate/up GEMM, SwiGLU with the routing weight folded into the [n, I] hidden
    (w * (a @ Wd.T) = (w * a) @ Wd.T), the down GEMM, and index_adds the rows into the calling thread's [T, H]
    accumulator. Saves only the [S, 2I] pre-activations and the routing. Backward re-gathers x and the upstream
    grad per expert and runs its four GEMMs (da, dW_down, dW_gate_up, dx) with SwiGLU's backward in between.
    No per-token Python: the only loop is over experts, in contiguous ranges of about equal rows, one per thread.
    Each thread writes an expert's gathered rows, GEMM outputs and SwiGLU steps into its own scratch buffers
    ([max rows, .]), reused expert after expert, so they stay in the core's cache instead of being fresh memory
    every time (3-7% of the routed forward+backward at the bench shape).
    In fp32 on CPU, where cpu_moe.py builds, each thread's loop is one C call with torch's own MKL sgemm (no
    Python or GIL per op), SwiGLU and its backward one fused pass each. Its threads take experts from a shared
    counter as they go (a core the host slows down takes fewer), so instead of per-thread accumulators, each
    expert writes its weighted output rows (backward: its dx rows) to their sorted places in an [S, H] buffer,
    and each token then sums its K rows in slot order: the same result for any thread count."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_gate_up, w_down):
        x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
        T, H = x.shape
        K = topk_ids.shape[1]
        E, I2, _ = w_gate_up.shape
        I = I2 // 2
        dt, acc = x.dtype, torch.promote_types(x.dtype, torch.float32)  # SwiGLU, weights, sums in >= fp32
        order, counts, offsets = sort_by_expert(topk_ids, E)
        bounds, rows = offsets.tolist(), int(counts.max())
        tok = order // K  # [S] token of each sorted row
        ws = topk_weights.reshape(-1)[order].to(acc)[:, None]  # [S, 1] routing weight of each sorted row
        h = x.new_empty(len(order), I2)  # [S, 2I] gate | up pre-activations, saved for backward
        workers, (lib, c_loop) = _workers(x), _c_kernels(x)
        if c_loop:  # threads take experts from a shared counter; each row lands at its sorted place in y [S, H]
            y, nxt = x.new_empty(len(order), H), torch.zeros(1, dtype=torch.int64)
            scratch = [cpu_moe.fwd_scratch(rows, H, I) for _ in range(workers)]
            _on_threads(lambda w: cpu_moe.expert_fwd(lib, x, tok, ws, offsets, nxt, w_gate_up, w_down, h, y,
                                                     scratch[w]), workers)
            out = _combine(lib, y, cpu_moe.inverse(order).view(T, K), workers)  # [T, H] each token's K rows summed
        else:  # static expert ranges, one per thread, each with its own [T, H] accumulator
            outs = [torch.zeros(T, H, dtype=acc, device=x.device) for _ in range(workers)]
            # per thread: gathered x rows [rows, H], hidden [rows, I], down-GEMM output [rows, H]
            scratch = [(x.new_empty(rows, H), x.new_empty(rows, I, dtype=acc), x.new_empty(rows, H))
                       for _ in range(workers)]

            def expert(e, w):
                r = slice(bounds[e], bounds[e + 1])
                n, te = r.stop - r.start, tok[r]
                xs, a_buf, y_buf = (b[:n] for b in scratch[w])
                he = torch.mm(torch.index_select(x, 0, te, out=xs), w_gate_up[e].t(), out=h[r])  # 'nh,ih->ni'
                if lib is not None:  # [n, I] w * silu(gate) * up
                    a = cpu_moe.swiglu_fwd(lib, he, ws[r], a_buf)
                else:
                    a = _silu_out(he[:, :I].to(acc), out=a_buf).mul_(he[:, I:]).mul_(ws[r])
                y = torch.mm(a.to(dt), w_down[e].t(), out=y_buf)  # [n, H] 'ni,hi->nh'
                outs[w].index_add_(0, te, y.to(acc))  # scatter-add into this thread's accumulator

            out = _sum_buffers(outs, _expert_parallel(expert, bounds, workers)).to(dt)
        ctx.save_for_backward(x, topk_weights, w_gate_up, w_down, order, h, ws, offsets)
        ctx.bounds, ctx.K, ctx.rows = bounds, K, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_weights, w_gate_up, w_down, order, h, ws, offsets = ctx.saved_tensors
        bounds, K, rows = ctx.bounds, ctx.K, ctx.rows
        T, H = x.shape
        I = h.shape[1] // 2
        tok = order // K
        dt, acc = x.dtype, ws.dtype
        g = grad_out.to(dt).contiguous()  # [T, H]
        # only what autograd asks for: frozen experts (e.g. LoRA on attention only) skip both weight-grad GEMMs
        need_x, need_w, need_gu, need_d = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        dws = torch.empty(len(order), dtype=acc, device=x.device) if need_w else None  # [S] routing-weight grads
        dwgu = torch.empty_like(w_gate_up) if need_gu else None
        dwd = torch.empty_like(w_down) if need_d else None
        workers, (lib, c_loop) = _workers(x), _c_kernels(x)
        if c_loop:  # threads take experts from a shared counter; dx rows land at their sorted places, then summed
            dx_rows, nxt = x.new_empty(len(order), H) if need_x else None, torch.zeros(1, dtype=torch.int64)
            scratch = [cpu_moe.bwd_scratch(rows, H, I) for _ in range(workers)]
            _on_threads(lambda w: cpu_moe.expert_bwd(lib, x, g, tok, ws, offsets, nxt, w_gate_up, w_down, h, dws,
                                                     dwgu, dwd, dx_rows, scratch[w]), workers)
            dx = _combine(lib, dx_rows, cpu_moe.inverse(order).view(T, K), workers) if need_x else None
        else:  # static expert ranges, one per thread, each with its own [T, H] dx accumulator
            for e in range(len(bounds) - 1):
                if bounds[e + 1] == bounds[e]:  # an expert with no rows gets a zero gradient
                    for dw in (dwgu, dwd):
                        if dw is not None:
                            dw[e].zero_()
            dxs = [torch.zeros(T, H, dtype=acc, device=x.device) for _ in range(workers)] if need_x else None
            # per thread: grad / x / dx rows [rows, H] (dt), da, silu(gate), a [rows, I] and dh [rows, 2I] (acc)
            scratch = [(x.new_empty(rows, H), x.new_empty(rows, H), x.new_empty(rows, H),
                        x.new_empty(rows, I), *(x.new_empty(rows, I, dtype=acc) for _ in range(3)),
                        x.new_empty(rows, 2 * I, dtype=acc)) for _ in range(workers)]

            def expert(e, w):
                r = slice(bounds[e], bounds[e + 1])
                n, te = r.stop - r.start, tok[r]
                gs, xs, dx_buf, da_buf, da_acc, act_buf, a_buf, dh = (b[:n] for b in scratch[w])
                ge = torch.index_select(g, 0, te, out=gs)  # [n, H] rows of the upstream grad
                da = torch.mm(ge, w_down[e], out=da_buf)  # [n, I] 'nh,hi->ni'
                if lib is not None:  # one C pass: dws, w * a (for dW_down) and dh, all of them whatever is asked
                    dw = dws[r] if need_w else act_buf.view(-1)[:n]
                    cpu_moe.swiglu_bwd(lib, h[r], da, ws[r], a_buf, dw, dh)
                    if need_d:
                        torch.mm(ge.t(), a_buf, out=dwd[e])  # [H, I] 'nh,ni->hi'
                else:
                    da = da_acc.copy_(da) if dt != acc else da
                    gate, up = h[r, :I].to(acc), h[r, I:].to(acc)
                    act = _silu_out(gate, out=act_buf)
                    if need_w or need_d:
                        a = torch.mul(act, up, out=a_buf)  # [n, I] expert hidden, from the saved pre-activations
                        if need_w:
                            torch.linalg.vecdot(da, a, out=dws[r])  # d out / d w = <grad, y_e> = <grad @ W_down, a>
                        if need_d:
                            torch.mm(ge.t(), a.mul_(ws[r]).to(dt), out=dwd[e])  # [H, I] 'nh,ni->hi'
                    if need_gu or need_x:
                        da.mul_(ws[r])
                        dgate = torch.mul(da, up, out=dh[:, :I])
                        _silu_backward_out(dgate, gate, grad_input=dgate)  # [n, I] d gate, in place
                        torch.mul(da, act, out=dh[:, I:])  # [n, I] d up
                dhd = dh.to(dt)  # [n, 2I] d gate | d up
                if need_gu:
                    torch.mm(dhd.t(), torch.index_select(x, 0, te, out=xs), out=dwgu[e])  # [2I, H] 'ni,nh->ih'
                if need_x:
                    dxs[w].index_add_(0, te, torch.mm(dhd, w_gate_up[e], out=dx_buf).to(acc))  # 'ni,ih->nh'

            used = _expert_parallel(expert, bounds, workers)
            dx = _sum_buffers(dxs, used).to(dt) if need_x else None
        dtw = torch.empty_like(dws).index_copy_(0, order, dws).view(T, K).to(topk_weights.dtype) if need_w else None
        return dx, None, dtw, dwgu, dwd


def moe_ffn_torch(x, topk_ids, topk_weights, w_gate_up, w_down):
    """Sorted torch path: per-expert gather, GEMMs, SwiGLU and scatter-back, experts split over CPU threads;
    custom backward (any device)."""
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
        need_x, need_w, need_gu, need_d = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        dwd = dwgu = dx = dtw = None
        if need_d:
            dwd = torch.empty_like(w_down)
            _grouped_wgrad(g, a.to(x.dtype), dwd, slots, poff, ws, K, True, False, bm, bn, bk)  # 'rh,ri->hi'
        if need_gu:
            dwgu = torch.empty_like(w_gate_up)
            _grouped_wgrad(dh, x, dwgu, slots, poff, None, K, False, True, bm, bn, bk)  # 'ri,rh->ih'
        if need_x:
            dxs = torch.empty(T * K, H, dtype=ws.dtype, device=x.device)  # [S, H] at (token, slot) positions
            _grouped_mm(dh, w_gate_up, dxs, slots, bexp, None, H, I2, K,
                        (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2)), False, True, bm, bn, bk)
            dx = dxs.view(T, K, H).sum(1).to(x.dtype)
        if need_w:
            valid = slots >= 0
            dtw = torch.zeros(T * K, dtype=ws.dtype, device=x.device)
            dtw[slots[valid]] = dws[valid]
            dtw = dtw.view(T, K).to(topk_weights.dtype)
        return dx, None, dtw, dwgu, dwd, None, None, None


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

