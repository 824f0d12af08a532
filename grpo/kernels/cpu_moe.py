"""The fp32 CPU MoE's expert loop in C, compiled at first use with the system compiler.

Each thread makes one C call that takes experts from a counter the threads share until none are left, and for
each: gathers the expert's token rows, runs the gate/up GEMM, SwiGLU, the down GEMM, and writes the weighted rows
to their sorted places; `combine` then sums each token's K rows in slot order (so the result is the same for any
thread count, and a core the host slows down simply takes fewer experts). Backward is the same with its four
GEMMs. The GEMMs are torch's own MKL sgemm (libtorch_cpu exports it): the same calls the loop in Python makes.
What C removes is the Python, GIL and dispatch around some twenty torch calls per expert, and SwiGLU's extra
passes as torch ops (eight in backward, three forward, each over rows the GEMMs had pushed out of cache).
Why C: Triton has no CPU backend here, and torch.compile took 10.6 s to compile the SwiGLU forward alone and
168 us a call on one expert's [384, 512] rows (the C pass: 39 us). The source is below; `cc` builds it in about
0.1 s, cached by a hash of source, flags, compiler and CPU, loaded through ctypes (which releases the GIL, so the
expert threads run in parallel); expf is vectorised by glibc's libmvec. Torch builds without MKL keep the loop in
Python with SwiGLU alone in C.
Anything missing (no compiler, no libmvec, a result that disagrees with torch) -> `load()` returns None with one
warning and the caller keeps the torch ops; off Linux it stays off silently. R1KIT_CPU_KERNELS=0 turns it off;
R1KIT_CACHE_DIR moves the cache. Only fp32: other dtypes keep the torch ops.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings

import torch
import torch.nn.functional as F

from grpo.kernels import cbuild

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#pragma omp declare simd notinbranch
float expf(float); /* vector variants come from glibc's libmvec */

/* forward: a[i, :] = w[i] * silu(g) * u for row i of h = [g | u] (h rows 2I apart, a rows I apart) */
void swiglu_fwd(const float *restrict h, const float *restrict w, float *restrict a, long n, long I) {
    for (long i = 0; i < n; i++) {
        const float *g = h + i * 2 * I, *u = g + I;
        float *o = a + i * I, wi = w[i];
#pragma omp simd
        for (long j = 0; j < I; j++) o[j] = wi * u[j] * g[j] / (1.0f + expf(-g[j]));
    }
}

/* backward, da = (upstream grad rows) @ W_down, unweighted. Per row i, with act = silu(g), a = act * u:
   dw[i] = <da, a> (dw may be NULL);  aw = w * a (for dW_down);  dh = [w * da * u * silu'(g) | w * da * act] */
void swiglu_bwd(const float *restrict h, const float *restrict da, const float *restrict w,
                float *restrict aw, float *restrict dw, float *restrict dh, long n, long I) {
    for (long i = 0; i < n; i++) {
        const float *g = h + i * 2 * I, *u = g + I, *d = da + i * I;
        float *o = aw + i * I, *dg = dh + i * 2 * I, *du = dg + I, wi = w[i], s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (long j = 0; j < I; j++) {
            float sg = 1.0f / (1.0f + expf(-g[j])), act = g[j] * sg, a = act * u[j], dwj = d[j] * wi;
            s += d[j] * a;
            o[j] = wi * a;
            dg[j] = dwj * u[j] * (sg + act * (1.0f - sg));
            du[j] = dwj * act;
        }
        if (dw) dw[i] = s;
    }
}

/* the expert loop: BLAS's Fortran sgemm (torch's own MKL, 32-bit ints), passed in by the caller */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *, const int *);

/* row-major c[m, n] = op(a) @ op(b), op = transpose when ta / tb; column-major BLAS computes c^T = op(b)^T op(a)^T */
static void mm(sgemm_t f, int ta, int tb, int m, int n, int k, const float *a, int lda, const float *b, int ldb,
               float *c, int ldc) {
    const float one = 1.0f, zero = 0.0f;
    f(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

/* rows[i] = x[tok[i]] */
static void gather(const float *restrict x, const int64_t *restrict tok, float *restrict rows, long n, long H) {
    for (long i = 0; i < n; i++) memcpy(rows + i * H, x + tok[i] * H, H * sizeof(float));
}

/* the next expert to take from the counter the threads share: each thread takes experts until none are left, so
   a core the host slows down takes fewer. Each expert's rows land at their own sorted places, so the result does
   not depend on which thread took which expert */
static long take(long *next) { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }

/* rows bounds[e] .. bounds[e+1] of the expert-sorted (token, slot) pairs belong to expert e; tok[S] are their
   tokens, ws[S] their routing weights. Per expert taken: gather x rows, h = x_e @ W_gu[e]^T (saved),
   a = w * swiglu(h), y[rows of e] = a @ W_d[e]^T. Scratch: xs[rows, H], a[rows, I]. Returns the GEMMs run. */
long moe_fwd(sgemm_t f, const float *x, const int64_t *tok, const float *ws, const int64_t *bounds, long E,
             long *next, const float *wgu, const float *wd, long H, long I, float *h, float *y, float *xs,
             float *a) {
    long gemms = 0;
    for (long e; (e = take(next)) < E;) {
        long b = bounds[e], n = bounds[e + 1] - b;
        if (n == 0) continue;
        gather(x, tok + b, xs, n, H);
        mm(f, 0, 1, n, 2 * I, H, xs, H, wgu + e * 2 * I * H, H, h + b * 2 * I, 2 * I); /* 'nh,ih->ni' */
        swiglu_fwd(h + b * 2 * I, ws + b, a, n, I);
        mm(f, 0, 1, n, H, I, a, I, wd + e * H * I, I, y + b * H, H); /* 'ni,hi->nh' */
        gemms += 2;
    }
    return gemms;
}

/* backward of moe_fwd, g[T, H] the upstream grad. Each output may be NULL (not asked for): dws[S] routing-weight
   grads, dwgu[E, 2I, H] and dwd[E, H, I] (an expert with no rows gets zeros), dxs[S, H] each row's grad of its
   token's x. Scratch: gs, xs [rows, H]; da, aw [rows, I]; dh [rows, 2I]. Returns the GEMMs run. */
long moe_bwd(sgemm_t f, const float *x, const float *g, const int64_t *tok, const float *ws, const int64_t *bounds,
             long E, long *next, const float *wgu, const float *wd, const float *h, long H, long I, float *dws,
             float *dwgu, float *dwd, float *dxs, float *gs, float *xs, float *da, float *aw, float *dh) {
    long gemms = 0;
    for (long e; (e = take(next)) < E;) {
        long b = bounds[e], n = bounds[e + 1] - b;
        if (n == 0) {
            if (dwgu) memset(dwgu + e * 2 * I * H, 0, 2 * I * H * sizeof(float));
            if (dwd) memset(dwd + e * H * I, 0, H * I * sizeof(float));
            continue;
        }
        gather(g, tok + b, gs, n, H);
        mm(f, 0, 0, n, I, H, gs, H, wd + e * H * I, I, da, I); /* da = 'nh,hi->ni' */
        swiglu_bwd(h + b * 2 * I, da, ws + b, aw, dws ? dws + b : NULL, dh, n, I);
        gemms += 1;
        if (dwd) { mm(f, 1, 0, H, I, n, gs, H, aw, I, dwd + e * H * I, I); gemms++; } /* 'nh,ni->hi' */
        if (dwgu) { /* 'ni,nh->ih' */
            gather(x, tok + b, xs, n, H);
            mm(f, 1, 0, 2 * I, H, n, dh, 2 * I, xs, H, dwgu + e * 2 * I * H, H);
            gemms++;
        }
        if (dxs) { mm(f, 0, 0, n, H, 2 * I, dh, 2 * I, wgu + e * 2 * I * H, H, dxs + b * H, H); gemms++; }
    }
    return gemms;
}

/* o = (first ? a : o + a) + b + c + d, the first m <= 4 of a..d, left to right */
#define ROWS(expr) _Pragma("omp simd") for (long j = 0; j < H; j++) o[j] = expr; break;
static void add_rows(float *restrict o, const float *restrict a, const float *restrict b, const float *restrict c,
                     const float *restrict d, long m, long H, int first) {
    switch (m * 2 + first) {
    case 3: ROWS(a[j])
    case 5: ROWS(a[j] + b[j])
    case 7: ROWS((a[j] + b[j]) + c[j])
    case 9: ROWS(((a[j] + b[j]) + c[j]) + d[j])
    case 2: ROWS(o[j] + a[j])
    case 4: ROWS((o[j] + a[j]) + b[j])
    case 6: ROWS(((o[j] + a[j]) + b[j]) + c[j])
    case 8: ROWS((((o[j] + a[j]) + b[j]) + c[j]) + d[j])
    }
}

/* out[t] = sum over k of rows[pos[t * K + k]] for tokens [lo, hi), k in order: pos[T * K] is the sorted place of
   each (token, slot) pair. A fixed order per token, so the sum is the same whatever the thread count. Rows are
   read four at a time (four streams from memory at once: 2.5x faster than one row after another, same bits) */
void combine(const float *rows, const int64_t *pos, float *out, long lo, long hi, long K, long H) {
    for (long t = lo; t < hi; t++) {
        const int64_t *p = pos + t * K;
        for (long k = 0; k < K; k += 4) {
            long m = K - k < 4 ? K - k : 4; /* rows past the m-th are not read: point them at the first */
            add_rows(out + t * H, rows + p[k] * H, rows + p[k + (m > 1)] * H, rows + p[k + (m > 2) * 2] * H,
                     rows + p[k + (m > 3) * 3] * H, m, H, k == 0);
        }
    }
}
"""
_LOCK = threading.Lock()
_LIB: list = []  # [] = not tried yet, [None] = unavailable, [lib] = loaded


def reference(h: torch.Tensor, da: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """What the two C passes compute, as torch ops: [w * a, dw, w * a, dh] with a = silu(gate) * up
    (swiglu_fwd's output, then swiglu_bwd's dw, aw and dh)."""
    I = da.shape[1]
    gate, up = h[:, :I], h[:, I:]
    act = F.silu(gate)
    return [w * act * up, (da * act * up).sum(-1), w * act * up,
            torch.cat([torch.ops.aten.silu_backward(w * da * up, gate), w * da * act], 1)]


def loop_reference(x, g, order, ws, bounds, w_gate_up, w_down):
    """What the C loop computes, as plain autograd over the same sorted rows (for the self-check and tests):
    order[S] the flat (token, slot) id of each sorted row; returns [out[T, H], dws[S], dW_gate_up, dW_down, dx]."""
    x, ws, w_gate_up, w_down = (t.detach().clone().requires_grad_() for t in (x, ws, w_gate_up, w_down))
    tok = order // (order.numel() // x.shape[0])
    with torch.enable_grad():  # load() may first run inside an autograd.Function's forward
        out = torch.zeros_like(x)
        for e in range(len(bounds) - 1):
            r = slice(bounds[e], bounds[e + 1])
            gate, up = (x[tok[r]] @ w_gate_up[e].T).chunk(2, -1)  # [n, I] each
            out = out.index_add(0, tok[r], (ws[r] * F.silu(gate) * up) @ w_down[e].T)
        out.backward(g)
    return [out.detach(), ws.grad.view(-1), w_gate_up.grad, w_down.grad, x.grad]


def run_loop(lib, x, g, order, ws, bounds, w_gate_up, w_down):
    """The C loop forward and backward on the calling thread, fresh buffers; returns what loop_reference does."""
    T, H = x.shape
    E, I2, _ = w_gate_up.shape
    S, rows = order.shape[0], int((bounds[1:] - bounds[:-1]).max())
    tok, pos = order // (S // T), inverse(order).view(T, S // T)
    h, y, dws, dxs = torch.empty(S, I2), torch.empty(S, H), torch.empty(S), torch.empty(S, H)
    out, dx, dwgu, dwd = torch.empty(T, H), torch.empty(T, H), torch.empty_like(w_gate_up), torch.empty_like(w_down)
    expert_fwd(lib, x, tok, ws, bounds, torch.zeros(1, dtype=torch.int64), w_gate_up, w_down, h, y,
               fwd_scratch(rows, H, I2 // 2))
    combine(lib, y, pos, out, 0, T)
    expert_bwd(lib, x, g, tok, ws, bounds, torch.zeros(1, dtype=torch.int64), w_gate_up, w_down, h, dws, dwgu, dwd,
               dxs, bwd_scratch(rows, H, I2 // 2))
    combine(lib, dxs, pos, dx, 0, T)
    return [out, dws, dwgu, dwd, dx]


def _self_check(lib) -> float:
    """Largest relative difference between the C code and torch's ops on random rows (large |g| included): the
    SwiGLU passes, then (where torch's sgemm was found) the whole expert loop, one expert left without rows."""
    gen = torch.Generator().manual_seed(0)
    n, I = 37, 45
    h = torch.randn(n, 2 * I, generator=gen) * 3
    h[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 30.0])
    w, da = torch.rand(n, 1, generator=gen) + 0.1, torch.randn(n, I, generator=gen)
    got = [torch.empty(n, I), torch.empty(n), torch.empty(n, I), torch.empty(n, 2 * I)]
    swiglu_fwd(lib, h, w, got[0])
    swiglu_bwd(lib, h, da, w, got[2], got[1], got[3])
    want = reference(h, da, w)
    if lib.sgemm is not None:
        T, H, E, K = 23, 19, 4, 2
        ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])  # expert E-1: no rows
        order = torch.argsort(ids.reshape(-1), stable=True)
        bounds = F.pad(torch.bincount(ids.reshape(-1), minlength=E).cumsum(0), (1, 0))
        args = (torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen), order,
                torch.rand(T * K, 1, generator=gen), bounds, torch.randn(E, 2 * I, H, generator=gen) / H**0.5,
                torch.randn(E, H, I, generator=gen) / I**0.5)
        got += run_loop(lib, *args)
        want += loop_reference(*args)
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want))


def _torch_sgemm() -> int | None:
    """Address of torch's own BLAS sgemm_ (MKL's LP64 Fortran entry, exported by libtorch_cpu): the GEMM torch.mm
    runs, so each expert's products are those of the loop in Python, bit for bit. None on builds without MKL."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def load():
    """The compiled library (ctypes), or None where it cannot be built or disagrees with torch (one warning)."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib, why = None, None
        cc = cbuild.compiler()
        if os.environ.get("R1KIT_CPU_KERNELS", "1") == "0" or platform.system() != "Linux":
            pass  # off on purpose, or no glibc libmvec to vectorise expf with: torch ops, silently
        elif cc is None:
            why = "no C compiler found; set CC"
        else:
            def declare(lib):
                p, n = ctypes.c_void_p, ctypes.c_long
                lib.swiglu_fwd.argtypes, lib.swiglu_fwd.restype = [p, p, p, n, n], None
                lib.swiglu_bwd.argtypes, lib.swiglu_bwd.restype = [p, p, p, p, p, p, n, n], None
                lib.moe_fwd.argtypes, lib.moe_fwd.restype = [p, p, p, p, p, n, p, p, p, n, n, p, p, p, p], n
                lib.moe_bwd.argtypes, lib.moe_bwd.restype = [p, p, p, p, p, p, n, p, p, p, p, n, n, *[p] * 9], n
                lib.combine.argtypes, lib.combine.restype = [p, p, p, n, n, n, n], None
                lib.sgemm = _torch_sgemm()  # None: SwiGLU in C, the rest of the loop in torch ops

            lib, why = cbuild.load_checked(cc, "moe", _SOURCE, declare, _self_check)
        if why:
            warnings.warn(f"r1kit: the compiled C kernels of the CPU MoE are off ({why}); the torch ops "
                          f"that replace them are slower", stacklevel=2)
        _LIB.append(lib)
        return lib


def _check(*pairs: tuple[torch.Tensor, tuple], dtype=torch.float32) -> None:
    """The C code walks raw pointers: anything but contiguous CPU rows of these shapes and dtype (fp32, or int64
    for the routing) would corrupt memory."""
    for t, shape in pairs:
        if t.shape != shape or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"cpu_moe: expected a contiguous {dtype} CPU tensor of shape {shape}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")


def swiglu_fwd(lib, h: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a[n, I] = w[n, 1] * silu(gate) * up for h[n, 2I] = [gate | up]; all fp32, contiguous, on CPU."""
    n, I = a.shape
    _check((h, (n, 2 * I)), (w, (n, 1)), (a, (n, I)))
    lib.swiglu_fwd(h.data_ptr(), w.data_ptr(), a.data_ptr(), n, I)
    return a


def swiglu_bwd(lib, h, da, w, aw, dw, dh) -> None:
    """From h[n, 2I] and da[n, I] (the unweighted grad of the hidden): dw[n] = <da, silu(gate) * up> per row,
    aw[n, I] = w * silu(gate) * up, dh[n, 2I] = d(w * silu(gate) * up) / d[gate | up] times da."""
    n, I = da.shape
    _check((h, (n, 2 * I)), (da, (n, I)), (w, (n, 1)), (aw, (n, I)), (dw, (n,)), (dh, (n, 2 * I)))
    lib.swiglu_bwd(h.data_ptr(), da.data_ptr(), w.data_ptr(), aw.data_ptr(), dw.data_ptr(), dh.data_ptr(), n, I)


def fwd_scratch(rows: int, H: int, I: int) -> tuple[torch.Tensor, ...]:
    """One thread's buffers for expert_fwd: gathered x rows [rows, H], hidden [rows, I]."""
    return torch.empty(rows, H), torch.empty(rows, I)


def bwd_scratch(rows: int, H: int, I: int) -> tuple[torch.Tensor, ...]:
    """One thread's buffers for expert_bwd: grad rows, x rows [rows, H]; da, w * a [rows, I]; dh [rows, 2I]."""
    return torch.empty(rows, H), torch.empty(rows, H), torch.empty(rows, I), torch.empty(rows, I), \
        torch.empty(rows, 2 * I)


def inverse(order: torch.Tensor) -> torch.Tensor:
    """pos[S] with pos[order[i]] = i: the sorted place of each flat (token, slot) pair, for combine."""
    return torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))


def _check_routing(tok, bounds, nxt, T, S, E, rows) -> None:
    """The loop indexes x by tok and its scratch by each expert's row count: both must be in range."""
    _check((tok, (S,)), (bounds, (E + 1,)), (nxt, (1,)), dtype=torch.int64)
    counts = bounds[1:] - bounds[:-1]
    if S and not (bounds[0] == 0 and bounds[-1] == S and counts.min() >= 0 and counts.max() <= rows
                  and tok.min() >= 0 and tok.max() < T):
        raise ValueError(f"cpu_moe: routing out of range (T={T}, S={S}, scratch rows={rows})")


def expert_fwd(lib, x, tok, ws, bounds, nxt, w_gate_up, w_down, h, y, scratch) -> int:
    """Take experts from the counter nxt (int64 [1], from 0) until none are left, and for each: h[rows of e, 2I] =
    gate | up pre-activations (saved for backward), y[rows of e, H] = w * expert output, in one C call (no GIL).
    Threads calling it with the same counter split the experts between them as they go. tok[S]: token of each
    sorted row, ws[S, 1] its routing weight, bounds[E+1]: expert row offsets. Needs lib.sgemm. Returns the GEMMs
    run."""
    T, H = x.shape
    E, I2, _ = w_gate_up.shape
    S, (xs, a) = tok.shape[0], scratch
    rows, I = xs.shape[0], I2 // 2
    _check((x, (T, H)), (ws, (S, 1)), (w_gate_up, (E, I2, H)), (w_down, (E, H, I)), (h, (S, I2)), (y, (S, H)),
           (xs, (rows, H)), (a, (rows, I)))
    _check_routing(tok, bounds, nxt, T, S, E, rows)
    ptr = [t.data_ptr() for t in (x, tok, ws, bounds)]
    return lib.moe_fwd(lib.sgemm, *ptr, E, nxt.data_ptr(), w_gate_up.data_ptr(), w_down.data_ptr(), H, I,
                       *(t.data_ptr() for t in (h, y, xs, a)))


def expert_bwd(lib, x, g, tok, ws, bounds, nxt, w_gate_up, w_down, h, dws, dwgu, dwd, dxs, scratch) -> int:
    """Backward of expert_fwd, experts taken from the counter nxt the same way; g[T, H] the upstream grad.
    Outputs not asked for are None: dws[S] routing-weight grads, dwgu / dwd weight grads (zeros for an expert
    without rows), dxs[S, H] each sorted row's share of its token's dx. Returns the GEMMs run (2-4 per expert
    with rows, by what is asked)."""
    T, H = x.shape
    E, I2, _ = w_gate_up.shape
    S, (gs, xs, da, aw, dh) = tok.shape[0], scratch
    rows, I = gs.shape[0], I2 // 2
    outs = [(dws, (S,)), (dwgu, (E, I2, H)), (dwd, (E, H, I)), (dxs, (S, H))]
    _check((x, (T, H)), (g, (T, H)), (ws, (S, 1)), (w_gate_up, (E, I2, H)), (w_down, (E, H, I)), (h, (S, I2)),
           *((t, s) for t, s in outs if t is not None), (gs, (rows, H)), (xs, (rows, H)), (da, (rows, I)),
           (aw, (rows, I)), (dh, (rows, I2)))
    _check_routing(tok, bounds, nxt, T, S, E, rows)
    ptr = [t.data_ptr() for t in (x, g, tok, ws, bounds)]
    return lib.moe_bwd(lib.sgemm, *ptr, E, nxt.data_ptr(), w_gate_up.data_ptr(), w_down.data_ptr(), h.data_ptr(),
                       H, I, *(None if t is None else t.data_ptr() for t, _ in outs),
                       *(t.data_ptr() for t in (gs, xs, da, aw, dh)))


def combine(lib, rows, pos, out, lo: int, hi: int) -> None:
    """out[t] = sum over k of rows[pos[t, k]] for tokens lo <= t < hi, k in order (deterministic): rows[S, H] at
    their sorted places, pos[T, K] the sorted place of each (token, slot) pair."""
    (T, K), (S, H) = pos.shape, rows.shape
    _check((rows, (S, H)), (out, (T, H)))
    _check((pos, (T, K)), dtype=torch.int64)
    if not 0 <= lo <= hi <= T or (pos.numel() and not (pos.min() >= 0 and pos.max() < S)):
        raise ValueError(f"cpu_moe: combine out of range (tokens {lo}..{hi} of {T}, {S} rows)")
    lib.combine(rows.data_ptr(), pos.data_ptr(), out.data_ptr(), lo, hi, K, H)
