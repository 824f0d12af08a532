"""grpo.runtime.keep_freed_memory: freed large tensors' pages are reused instead of faulted in again every step."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt)")

STEP = """
import resource, sys, torch
from grpo.runtime import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else False)
def step():  # a training step's worth of large temporaries, allocated and freed in the same order every time
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(12 << 20); b = torch.ones(6 << 20); c = a[:6 << 20] + b; del a, b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
print(sum([step() for _ in range(16)][-6:]))  # the last 6 steps: glibc settles on a layout within a few
"""


def faults_per_step(mode):
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}).stdout.split()
    return out[0] == "True", int(out[1])


def test_keep_freed_memory_stops_page_faults_on_reused_blocks():
    applied, kept = faults_per_step("keep")
    _, default = faults_per_step("default")
    assert applied
    assert default > 20_000, default  # 96 MB a step: glibc defaults fault in fresh mmaps on most steps (37k-129k seen)
    assert kept < 1_000, (kept, default)


def test_user_tunables_win():
    code = "from grpo.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout.strip()
    assert out == "False"
