"""Process settings for CPU training: keep large freed blocks in glibc's heap so each step reuses warm pages.

glibc serves a large allocation that no free block of its heap fits with a fresh mmap (its mmap threshold rises to
32 MB at most) and unmaps it on free, and it trims freed memory off the heap's top, so a training step that frees
and re-allocates the same activations and weight gradients pays a page fault and a kernel page-zeroing for every
4 KB of them, every step. On the MoE benchmark shape that was about 47,000 faults per forward+backward, about 7%
of r1kit's time there (bench/moe.py, README). PyTorch's CUDA allocator caches blocks for the same reason; on CPU,
PyTorch and vLLM advise preloading tcmalloc or jemalloc, which a pip install cannot provide, so we set glibc's own
knobs (mallopt) instead. The cost: the process keeps the heap it has grown, fragments included, instead of
handing memory back between steps (tests/test_runtime.py checks that it settles).
`r1` calls this at start-up; library users may call it. To opt out, set any of glibc's malloc tunables in the
environment (e.g. MALLOC_TRIM_THRESHOLD_=131072, glibc's default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's <malloc.h>
_LIMIT = 2**31 - 1  # mallopt takes an int: blocks below ~2 GiB come from the heap and stay there when freed
_USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so that freed tensors' pages are reused instead of unmapped and
    faulted in again. Returns whether the setting is in effect. Does nothing off glibc, or when the user has set
    glibc's malloc tunables in the environment themselves (theirs win)."""
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in _USER_TUNABLES):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT))
    return _applied


_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 BF16, AMX) and aarch64 (FEAT_BF16) cpuinfo names


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (a flag above in /proc/cpuinfo). Without them torch emulates bf16
    GEMMs, >100x slower than fp32 (0.8 vs 110 GFLOP/s on an AVX2 Zen1). R1KIT_CPU_BF16=0|1 overrides."""
    forced = os.environ.get("R1KIT_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"R1KIT_CPU_BF16 must be 0 or 1, not {forced!r}")
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        return False  # not Linux: assume emulation rather than risk a bench that never finishes
    return any(_BF16_FLAGS & set(line.split(":", 1)[-1].split()) for line in lines)
