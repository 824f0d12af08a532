"""One decoding step of attention in C for the native sampler on CPU: a single pass over each row's cached keys
and values, read in place from the sampler's strided KV buffer.

Why C: on a decoding step every (row, KV head) is its own tiny [R, D] x [D, T] product (R query heads share a KV
head), and torch's sdpa or bmm pays a per-product setup and a copy of the strided cache view that cost 3-5x the
time of reading the cache once; the sampler spent about half its time there (bench/rollout.py). The kernel does
scores, a max-shifted softmax and the weighted sum of values per (row, KV head) with the scores in a small scratch
row, so the cache is read exactly once. Rows are split over torch's thread count by OpenMP in the C code: the
library links libgomp, which the loader resolves to the one torch's CPU wheel already loaded, so it runs on
torch's own thread team (a Python thread pool beside that team's spinning threads made a 2-core step 4x slower).
The query is fp32; the cache fp32 or bf16 (a second build, which widens each bf16 value on load: a bf16 sampler
reads half the bytes). Anything else, or a library that cannot be built or disagrees with torch, keeps torch's sdpa.
R1KIT_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import torch

from grpo.kernels import cbuild

_SOURCE = r"""
#include <math.h>
#include <omp.h>
#pragma omp declare simd notinbranch
float expf(float); /* vector variants come from glibc's libmvec */
/* 8 floats, loadable from any float address (the compiler lowers it to the CPU's vector width) */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
static inline float hsum(v8 c) { return ((c[0] + c[4]) + (c[1] + c[5])) + ((c[2] + c[6]) + (c[3] + c[7])); }
#ifdef KV_BF16 /* a bf16 cache: the top half of an fp32, widened on load, so the cache read from memory halves */
typedef unsigned short kv_t;
typedef unsigned short h8 __attribute__((vector_size(16), aligned(2)));
typedef unsigned int w8 __attribute__((vector_size(32)));
static inline v8 load8(const kv_t *p) { return (v8)(__builtin_convertvector(*(const h8 *)p, w8) << 16); }
static inline float load1(kv_t x) { union { unsigned int u; float f; } c = {(unsigned int)x << 16}; return c.f; }
#else
typedef float kv_t;
static inline v8 load8(const kv_t *p) { return *(const v8 *)p; }
static inline float load1(kv_t x) { return x; }
#endif

/* One decoding step for all B rows. q [B, H, R, D] and out [B, H, R, Dv] contiguous fp32 (R query heads per KV
   head); k, v (fp32, or bf16 built with KV_BF16): element strides (batch, head, position), last dim contiguous;
   mask: additive [B, T] with batch stride msb, or NULL; scratch: R * T floats per thread. out[b,h,r] = softmax_t(scale * q[b,h,r].k[b,h,t] + mask[b,t]) @ v[b,h,t].
   Rows are split over `threads` OpenMP threads: torch's own libgomp team, so no second pool competes with it. */
void decode_attn(const float *restrict q, const kv_t *restrict k, const kv_t *restrict v,
                 const float *restrict mask, float *restrict out, float *restrict scratch, long threads,
                 long B, long H, long R, long T, long D, long Dv,
                 long ksb, long ksh, long kst, long vsb, long vsh, long vst, long msb, float scale) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        float *s = scratch + omp_get_thread_num() * R * T;
        const float *m = mask ? mask + b * msb : 0;
        for (long h = 0; h < H; h++) {
            const kv_t *kb = k + b * ksb + h * ksh, *vb = v + b * vsb + h * vsh;
            const float *qb = q + (b * H + h) * R * D;
            float *ob = out + (b * H + h) * R * Dv;
            long t = 0;
            for (; t + 4 <= T; t += 4) { /* four positions at a time: four vector accumulators in flight */
                const kv_t *k0 = kb + t * kst, *k1 = k0 + kst, *k2 = k1 + kst, *k3 = k2 + kst;
                for (long r = 0; r < R; r++) {
                    const float *qr = qb + r * D;
                    v8 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
                    long d = 0;
                    for (; d + 8 <= D; d += 8) {
                        v8 x = *(const v8 *)(qr + d);
                        c0 += x * load8(k0 + d);
                        c1 += x * load8(k1 + d);
                        c2 += x * load8(k2 + d);
                        c3 += x * load8(k3 + d);
                    }
                    float a0 = hsum(c0), a1 = hsum(c1), a2 = hsum(c2), a3 = hsum(c3);
                    for (; d < D; d++) {
                        a0 += qr[d] * load1(k0[d]);
                        a1 += qr[d] * load1(k1[d]);
                        a2 += qr[d] * load1(k2[d]);
                        a3 += qr[d] * load1(k3[d]);
                    }
                    float *sr = s + r * T + t;
                    sr[0] = a0 * scale + (m ? m[t] : 0.0f);
                    sr[1] = a1 * scale + (m ? m[t + 1] : 0.0f);
                    sr[2] = a2 * scale + (m ? m[t + 2] : 0.0f);
                    sr[3] = a3 * scale + (m ? m[t + 3] : 0.0f);
                }
            }
            for (; t < T; t++) {
                const kv_t *kt = kb + t * kst;
                for (long r = 0; r < R; r++) {
                    const float *qr = qb + r * D;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (long d = 0; d < D; d++) acc += qr[d] * load1(kt[d]);
                    s[r * T + t] = acc * scale + (m ? m[t] : 0.0f);
                }
            }
            for (long r = 0; r < R; r++) {
                float *sr = s + r * T, mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
                for (long t = 0; t < T; t++) mx = sr[t] > mx ? sr[t] : mx;
#pragma omp simd reduction(+ : sum)
                for (long t = 0; t < T; t++) {
                    float e = expf(sr[t] - mx);
                    sr[t] = e;
                    sum += e;
                }
                float inv = 1.0f / sum, *o = ob + r * Dv;
#pragma omp simd
                for (long t = 0; t < T; t++) sr[t] *= inv;
                for (long d = 0; d < Dv; d++) o[d] = 0.0f;
            }
            t = 0;
            for (; t + 4 <= T; t += 4) { /* o += p_t v_t for four positions per pass over o */
                const kv_t *v0 = vb + t * vst, *v1 = v0 + vst, *v2 = v1 + vst, *v3 = v2 + vst;
                for (long r = 0; r < R; r++) {
                    const float *p = s + r * T + t;
                    float *o = ob + r * Dv;
#pragma omp simd
                    for (long d = 0; d < Dv; d++)
                        o[d] += p[0] * load1(v0[d]) + p[1] * load1(v1[d]) + p[2] * load1(v2[d]) + p[3] * load1(v3[d]);
                }
            }
            for (; t < T; t++) {
                const kv_t *vt = vb + t * vst;
                for (long r = 0; r < R; r++) {
                    float p = s[r * T + t], *o = ob + r * Dv;
#pragma omp simd
                    for (long d = 0; d < Dv; d++) o[d] += p * load1(vt[d]);
                }
            }
        }
    }
}
"""
_LOCK = threading.Lock()
_LIBS: dict = {}  # cache dtype -> the library built for it, or None where unavailable
KV_DTYPES = (torch.float32, torch.bfloat16)


def reference(q, key, value, mask, scale: float) -> torch.Tensor:
    """What the kernel computes, as torch ops: q [B, H, R, D], key/value [B, H, T, D], mask [B, 1, 1, T] or None."""
    s = torch.matmul(q, key.to(q.dtype).transpose(-1, -2)) * scale  # [B, H, R, T]
    if mask is not None:
        s = s + mask
    return torch.matmul(torch.softmax(s, -1), value.to(q.dtype))


def _self_check(lib, dtype: torch.dtype) -> float:
    """Largest relative difference to `reference` on random strided inputs (a `dtype` cache) with masked positions."""
    gen = torch.Generator().manual_seed(0)
    B, H, R, T, D = 5, 3, 2, 19, 16
    q = torch.randn(B, H, R, D, generator=gen)
    kbuf, vbuf = (torch.randn(B, H, T + 7, D, generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros(B, 1, 1, T + 7)
    mask[1, ..., :4] = float("-inf")
    want = reference(q, kbuf[:, :, :T], vbuf[:, :, :T], mask[..., :T], 0.25)
    got = _run(lib, q, kbuf[:, :, :T], vbuf[:, :, :T], mask[..., :T], 0.25, threads=2)
    return ((got - want).abs().max() / want.abs().max()).item()


def load(dtype: torch.dtype = torch.float32):
    """The compiled library (ctypes) for a `dtype` KV cache, or None where it cannot be built or disagrees with
    torch (one warning)."""
    with _LOCK:
        if dtype in _LIBS:
            return _LIBS[dtype]
        lib, why, cc = None, None, cbuild.compiler()
        if os.environ.get("R1KIT_CPU_KERNELS", "1") == "0" or cc is None:
            pass  # off on purpose, or not Linux / no compiler: torch's sdpa, silently (the MoE kernel warns)
        else:
            def declare(lib):
                p, n = ctypes.c_void_p, ctypes.c_long
                lib.decode_attn.argtypes, lib.decode_attn.restype = [p] * 6 + [n] * 14 + [ctypes.c_float], None

            flags = [f.replace("-fopenmp-simd", "-fopenmp") for f in cbuild.FLAGS]  # OpenMP: torch's team
            bf16 = dtype == torch.bfloat16
            lib, why = cbuild.load_checked(cc, "attention_bf16" if bf16 else "attention",
                                           ("#define KV_BF16 1\n" if bf16 else "") + _SOURCE, declare,
                                           lambda lib: _self_check(lib, dtype), flags)
        if why:
            warnings.warn(f"r1kit: the C decoding attention ({dtype}) is off ({why}); torch's sdpa replaces it",
                          stacklevel=2)
        _LIBS[dtype] = lib
        return lib


def usable(q, key, value, mask) -> bool:
    """Whether the kernel takes these tensors: on CPU, an fp32 query, fp32 or bf16 keys and values with a contiguous
    last dim, and an additive fp32 mask of shape [B, 1, 1, T] (or none)."""
    ok = all(t.device.type == "cpu" for t in (q, key, value)) and q.dtype == torch.float32 \
        and key.dtype == value.dtype and key.dtype in KV_DTYPES
    ok = ok and key.stride(-1) == 1 and value.stride(-1) == 1 and key.shape[:3] == value.shape[:3] \
        and q.dim() == key.dim() == 4 and q.shape[:2] == key.shape[:2] and q.shape[-1] == key.shape[-1]
    if mask is not None:
        ok = ok and mask.dtype == torch.float32 and mask.dim() == 4 and mask.shape[1:3] == (1, 1) \
            and mask.shape[-1] == key.shape[2] and mask.stride(-1) == 1 and mask.shape[0] in (1, key.shape[0])
    return ok


def _run(lib, q, key, value, mask, scale: float, threads: int) -> torch.Tensor:
    """out [B, H, R, Dv] for q [B, H, R, D] and strided key/value [B, H, T, D]; rows split over `threads`."""
    q = q.contiguous()
    B, H, R, D = q.shape
    T, Dv = key.shape[2], value.shape[-1]
    out = q.new_empty(B, H, R, Dv)
    msb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    threads = max(1, min(threads, B))
    scratch = torch.empty(threads, R * T)
    lib.decode_attn(q.data_ptr(), key.data_ptr(), value.data_ptr(), None if mask is None else mask.data_ptr(),
                    out.data_ptr(), scratch.data_ptr(), threads, B, H, R, T, D, Dv, *key.stride()[:3],
                    *value.stride()[:3], msb, scale)
    return out


def decode(q, key, value, mask, scale: float) -> torch.Tensor | None:
    """The kernel's output for one decoding step, or None where it does not apply (caller falls back to sdpa)."""
    if not usable(q, key, value, mask):
        return None
    lib = load(key.dtype)
    if lib is None:
        return None
    return _run(lib, q, key, value, mask, scale, torch.get_num_threads())
