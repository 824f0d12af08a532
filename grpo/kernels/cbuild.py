"""Build a C source into a cached shared library with the system compiler (the CPU kernels' one build step).

The library is named by a hash of source, flags, compiler version and the CPU's feature flags (what -march=native
compiles for), so a shared cache never serves another CPU or a stale build; R1KIT_CACHE_DIR moves the cache.
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

FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
LIBS = ["-lmvec", "-lm"]  # expf in `omp simd` loops is vectorised by glibc's libmvec


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc / gcc / clang on PATH; None off Linux (libmvec is glibc's)."""
    if platform.system() != "Linux":
        return None
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> str:
    """Where built libraries live: $R1KIT_CACHE_DIR/kernels, else $XDG_CACHE_HOME (or ~/.cache)/r1kit/kernels."""
    root = os.environ.get("R1KIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "r1kit")
    return os.path.join(root, "kernels")


def _cpu_id() -> str:
    """The CPU's feature flags, or the processor name where /proc/cpuinfo has none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def build(cc: str, name: str, source: str, flags=FLAGS, libs=LIBS) -> str:
    """Build (or find cached) `source` as a shared library; returns its path. Raises on a failed build."""
    cmd = shlex.split(cc)  # CC may carry a wrapper or flags, e.g. "ccache gcc"
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source, *flags, *libs, cc, version, _cpu_id()]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    path = os.path.join(out_dir, f"{name}-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # concurrent builders (torchrun ranks) never collide
        src, lib = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
        with open(src, "w") as f:
            f.write(source)
        r = subprocess.run([*cmd, *flags, "-o", lib, src, *libs], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r}")
        os.replace(lib, path)  # atomic: a reader sees no file or the whole library
    return path


def load_checked(cc: str, name: str, source: str, declare, self_check, flags=FLAGS):
    """(library, None) when `source` builds, `declare(lib)` sets its signatures and `self_check(lib)` (the largest
    relative difference to torch) is within 1e-5; else (None, why)."""
    try:
        lib = ctypes.CDLL(build(cc, name, source, flags))
        declare(lib)
        err = self_check(lib)
        return (lib, None) if err <= 1e-5 else (None, f"its results differ from torch's by {err:.1e}")
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e)
