"""SwiGLU of the MoE torch path on CPU in one fused C pass each way, compiled at first use with the system compiler.

Why C: per expert, torch's elementwise ops make eight passes over the [n, I] rows in backward (silu, product,
row dot, two weight scalings, silu_backward, two products) and three in forward, each reading rows that the
GEMMs around them have pushed out of cache; one pass reads them once. Triton has no CPU backend here, and
torch.compile took 10.6 s to compile the forward alone and 168 us a call on one expert's [384, 512] rows
(this C pass: 39 us), so this is a few lines of C built with `cc` (about 0.1 s), cached by a hash of source,
flags, compiler and CPU, and called through ctypes (which releases the GIL, so the expert threads run it in
parallel). expf is vectorised by glibc's libmvec.
Anything missing (no compiler, no libmvec, a result that disagrees with torch) -> `load()` returns None with one
warning and the caller keeps the torch ops; off Linux it stays off silently. R1KIT_CPU_KERNELS=0 turns it off;
R1KIT_CACHE_DIR moves the cache. Only fp32: other dtypes keep the torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch
import torch.nn.functional as F

_SOURCE = r"""
#include <math.h>
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
   dw[i] = <da, a>;  aw = w * a (for dW_down);  dh = [w * da * u * silu'(g) | w * da * act] (rows 2I apart) */
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
        dw[i] = s;
    }
}
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
_LIBS = ["-lmvec", "-lm"]
_LOCK = threading.Lock()
_LIB: list = []  # [] = not tried yet, [None] = unavailable, [lib] = loaded


def _cache_dir() -> str:
    """Where built libraries live: $R1KIT_CACHE_DIR/kernels, else $XDG_CACHE_HOME (or ~/.cache)/r1kit/kernels."""
    root = os.environ.get("R1KIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "r1kit")
    return os.path.join(root, "kernels")


def _cpu_id() -> str:
    """The CPU's feature flags (what -march=native compiles for), so a shared cache never serves another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _compile(cc: str) -> str:
    """Build (or find cached) the shared library; returns its path. Raises on a failed build."""
    cmd = shlex.split(cc)  # CC may carry a wrapper or flags, e.g. "ccache gcc"
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, *_LIBS, cc, version, _cpu_id()]).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    path = os.path.join(out_dir, f"swiglu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # concurrent builders (torchrun ranks) never collide
        src, lib = os.path.join(tmp, "swiglu.c"), os.path.join(tmp, "swiglu.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        r = subprocess.run([*cmd, *_FLAGS, "-o", lib, src, *_LIBS], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r}")
        os.replace(lib, path)  # atomic: a reader sees no file or the whole library
    return path


def reference(h: torch.Tensor, da: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """What the two C passes compute, as torch ops: [w * a, dw, w * a, dh] with a = silu(gate) * up
    (swiglu_fwd's output, then swiglu_bwd's dw, aw and dh)."""
    I = da.shape[1]
    gate, up = h[:, :I], h[:, I:]
    act = F.silu(gate)
    return [w * act * up, (da * act * up).sum(-1), w * act * up,
            torch.cat([torch.ops.aten.silu_backward(w * da * up, gate), w * da * act], 1)]


def _self_check(lib) -> float:
    """Largest relative difference between the C passes and torch's ops on random rows (large |g| included)."""
    g = torch.Generator().manual_seed(0)
    n, I = 37, 45
    h = torch.randn(n, 2 * I, generator=g) * 3
    h[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 30.0])
    w, da = torch.rand(n, 1, generator=g) + 0.1, torch.randn(n, I, generator=g)
    got = [torch.empty(n, I), torch.empty(n), torch.empty(n, I), torch.empty(n, 2 * I)]
    swiglu_fwd(lib, h, w, got[0])
    swiglu_bwd(lib, h, da, w, got[2], got[1], got[3])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, reference(h, da, w)))


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc / gcc / clang on PATH; None off Linux (libmvec is glibc's)."""
    if platform.system() != "Linux":
        return None
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def load():
    """The compiled library (ctypes), or None where it cannot be built or disagrees with torch (one warning)."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib, why = None, None
        cc = compiler()
        if os.environ.get("R1KIT_CPU_KERNELS", "1") == "0" or platform.system() != "Linux":
            pass  # off on purpose, or no glibc libmvec to vectorise expf with: torch ops, silently
        elif cc is None:
            why = "no C compiler found; set CC"
        else:
            try:
                lib = ctypes.CDLL(_compile(cc))
                p, n = ctypes.c_void_p, ctypes.c_long
                lib.swiglu_fwd.argtypes, lib.swiglu_fwd.restype = [p, p, p, n, n], None
                lib.swiglu_bwd.argtypes, lib.swiglu_bwd.restype = [p, p, p, p, p, p, n, n], None
                err = _self_check(lib)
                if not err <= 1e-5:
                    lib, why = None, f"its results differ from torch's by {err:.1e}"
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
                lib, why = None, str(e)
        if why:
            warnings.warn(f"r1kit: the fused C SwiGLU for the CPU MoE is off ({why}); the torch ops "
                          f"that replace it are slower", stacklevel=2)
        _LIB.append(lib)
        return lib


def _check(*pairs: tuple[torch.Tensor, tuple]) -> None:
    """The C code walks raw pointers: anything but contiguous fp32 CPU rows of these shapes would corrupt memory."""
    for t, shape in pairs:
        if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"cpu_swiglu: expected a contiguous fp32 CPU tensor of shape {shape}, got "
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
