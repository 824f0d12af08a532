"""Benches on CPUs without bf16 units: the capability check (grpo.runtime.cpu_has_fast_bf16) and its override, and
bench/moe.py skipping its bf16 rows (torch emulates bf16 there, minutes per GEMM) while its fp32 lines still print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.runtime import cpu_has_fast_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_has_fast_bf16_reads_cpuinfo_and_obeys_the_override(monkeypatch):
    monkeypatch.delenv("R1KIT_CPU_BF16", raising=False)
    try:
        flags = {w for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))
                 for w in line.split(":", 1)[-1].split()}
    except OSError:
        flags = set()
    assert cpu_has_fast_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    monkeypatch.setenv("R1KIT_CPU_BF16", "0")
    assert cpu_has_fast_bf16() is False
    monkeypatch.setenv("R1KIT_CPU_BF16", "1")
    assert cpu_has_fast_bf16() is True
    monkeypatch.setenv("R1KIT_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="R1KIT_CPU_BF16"):
        cpu_has_fast_bf16()


def test_every_bench_that_uses_bf16_checks_the_cpu_first():
    """A bench that makes bf16 tensors must ask cpu_has_fast_bf16 before it times them on a CPU."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        src = path.read_text()
        if re.search(r"bfloat16|\.half\(|float16", src):
            assert "cpu_has_fast_bf16" in src, f"{path.name} runs bf16 without checking the CPU"


def test_moe_bench_skips_bf16_rows_without_units_and_prints_the_fp32_ratio_last():
    """The whole bench at a tiny shape on the CPU, bf16 units forced off: the reason is printed, no bf16 row is,
    and the fp32 table and the speed-up line still are, the latter last."""
    env = dict(os.environ, R1KIT_CPU_BF16="0", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "bench/moe.py", "--tokens", "16", "--repeats", "1", "--peak-n", "64"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("bf16 rows skipped: this CPU has no bf16 matmul units") for line in lines), lines
    assert not any("bf16 GFLOP/s" in line or "variant (bf16)" in line or line.startswith("bf16:") for line in lines)
    assert any(line.startswith("variant (fp32)") for line in lines)
    assert re.fullmatch(r"r1kit vs fastest transformers backend \((eager|grouped_mm), fp32\): [\d.]+x", lines[-1])
