"""DeepSpeed ZeRO against DDP: a real 2-process gloo torchrun (tests/deepspeed_script.py) runs the same SFT under DDP,
ZeRO-2 and ZeRO-3 and the same GRPO under DDP and ZeRO-2, resumes a ZeRO-3 SFT and a ZeRO-2 GRPO run, and reports
what each rank holds; this test compares the checkpoints. Tolerance as in tests/test_fsdp.py: fp32 weights, and the
runs differ only in the order the gradient is summed (DDP's all-reduce against ZeRO's reduce-scatter into flat
partitions, ZeRO-3 also gathering each weight before its use), ~1e-7 to 1e-6 relative after a few Adam steps;
each tensor's ||a - b|| / ||b|| < 1e-5 (a wrong loss scaling or a skipped warmup step gives 1e-4 and more).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from grpo.config import RuntimeConfig
from tests.helpers import tiny_checkpoint
from tests.test_fsdp import RTOL, max_abs, max_rel, reference_held, weights

REPO = Path(__file__).resolve().parents[1]



def log(d: Path) -> list[dict]:
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def test_zero2_and_zero3_match_ddp_and_resume_exactly(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "tests/deepspeed_script.py", str(base), str(out)], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=500)
    assert p.returncode == 0, p.stderr[-4000:]
    start = weights(base)

    # ZeRO-2: each rank's fp32 optimizer partition (and so each Adam moment) is half; ZeRO-3: the weights too
    c = json.loads((out / "counts.json").read_text())
    print(f"ZeRO per-rank elements: {c}")
    for stage in ("zero2", "zero3"):
        local, total = c[stage]["local"], c[stage]["total"]
        assert len(local) == 2 and total == sum(v.numel() for v in start.values())
        assert all(abs(n - total / 2) <= 0.01 * total for n in local) and sum(local) >= total

    # SFT on the same global batch, through a 2-step warmup: ZeRO-2 == ZeRO-3 == DDP
    sft = {k: weights(out / f"sft_{k}" / "final") for k in ("ddp", "zero2", "zero3")}
    diffs = {f"{k} vs ddp": max_rel(sft[k], sft["ddp"]) for k in ("zero2", "zero3")}
    moved = max_rel(sft["ddp"], start)
    print(f"SFT max rel diff {diffs}; max abs zero3 vs ddp {max_abs(sft['zero3'], sft['ddp']):.3g}; "
          f"weights moved by {moved:.3g} (rel)")
    assert moved > 1000 * RTOL and all(d < RTOL for d in diffs.values()), diffs
    assert all(sorted(w) == sorted(start) for w in sft.values())  # plain HF weights, one copy of the tied head
    logs = {k: log(out / f"sft_{k}") for k in ("ddp", "zero2", "zero3")}
    for k in ("zero2", "zero3"):
        for a, b in zip(logs[k], logs["ddp"], strict=True):
            assert a["num_processes"] == 2 and a["tokens"] == b["tokens"]
            for key in ("loss", "grad_norm", "eval_loss"):
                assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) <= RTOL * b.get(key, 1), key

    # ZeRO-3 SFT resumed from its step-2 checkpoint (the engine's partitions + per-rank RNG): bit-exact
    ts = out / "sft_zero3" / "last" / "trainer_state"
    assert sorted(f.name for f in ts.iterdir()) == ["deepspeed", "rank0.pt", "rank1.pt", "state.pt"]
    resumed = weights(out / "sft_resumed" / "final")
    assert all(torch.equal(resumed[k], sft["zero3"][k]) for k in resumed)
    assert [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in log(out / "sft_resumed")] == \
        [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in logs["zero3"][2:]]

    # GRPO (KL reference, a reference reset, micro-batches): ZeRO-2 and ZeRO-3 == DDP (under ZeRO-3 the native
    # sampler runs on the gathered weights and the reset reads the partitioned policy), and ZeRO-2 resumes bit-exact
    g = {k: weights(out / f"grpo_{k}" / "final") for k in ("ddp", "zero2", "zero3", "resumed")}
    g_moved = max_rel(g["ddp"], start)
    for k in ("zero2", "zero3"):
        g_diff = max_rel(g[k], g["ddp"])
        print(f"GRPO max rel diff {k} vs ddp {g_diff:.3g}, max abs {max_abs(g[k], g['ddp']):.3g}; "
              f"weights moved by {g_moved:.3g} (rel)")
        assert g_moved > 1000 * RTOL and g_diff < RTOL
        for a, b in zip(log(out / f"grpo_{k}"), log(out / "grpo_ddp"), strict=True):
            assert a["num_processes"] == 2 and a["completions/mean_length"] == b["completions/mean_length"]
            assert abs(a["grad_norm"] - b["grad_norm"]) <= RTOL * b["grad_norm"]
    assert "[grpo] DeepSpeed ZeRO-3 over 2 processes" in (out / "grpo_zero3" / "console.txt").read_text()
    # LoRA GRPO: ZeRO-2 and ZeRO-3 == DDP, merged weights and adapter
    lora = {k: (weights(out / f"grpo_lora_{k}" / "final"), weights(out / f"grpo_lora_{k}" / "final" / "adapter"))
            for k in ("ddp", "zero2", "zero3")}
    l_diffs = {k: max(max_rel(lora[k][i], lora["ddp"][i]) for i in (0, 1)) for k in ("zero2", "zero3")}
    print(f"LoRA GRPO max rel diff vs ddp (merged weights and adapter): {l_diffs}")
    assert all(v < RTOL for v in l_diffs.values()) and all(float(v.norm()) > 0 for k, v in lora["ddp"][1].items()
                                                            if "lora_B" in k)
    push = json.loads((out / "lora_push.json").read_text())  # the weight stream vLLM gets from the ZeRO-3 LoRA model
    print(f"LoRA vLLM stream under ZeRO-3: {push['n']} tensors, max |partitioned - whole| {push['max_abs']:.2g}, "
          f"merged delta up to {push['delta']:.2g}")
    assert push["sharded"] and push["same_names"] and push["delta"] > 1e-3 and push["max_abs"] <= 1e-6
    assert all(torch.equal(v, g["zero2"][k]) for k, v in g["resumed"].items())
    held, total = reference_held(out / "grpo_zero2")  # the reference is sharded under ZeRO-2 too
    print(f"GRPO reference under ZeRO-2: rank 0 holds {held} of {total} elements")
    assert total == c["zero2"]["total"] and abs(held - total / 2) <= 0.03 * total / 2
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in log(out / "grpo_resumed")] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in log(out / "grpo_zero2")[2:]]


def test_deepspeed_config_errors():
    """zero_stage is 2 or 3, naming the field."""
    assert RuntimeConfig(distributed="deepspeed").zero_stage == 2
    with pytest.raises(ValidationError, match="zero_stage"):
        RuntimeConfig(distributed="deepspeed", zero_stage=1)


def test_accelerate_config_flag_launches_deepspeed(tmp_path):
    """`r1 sft --accelerate-config deepspeed_zero2` (a shipped config, by name) re-executes under `accelerate
    launch`: 2 processes, one engine, rank 0 alone prints; an unknown config is a one-line error naming the flag."""
    base = tiny_checkpoint(tmp_path / "base")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r1 = [sys.executable, "-m", "grpo.cli", "sft", "r1-zero-tiny"]
    p = subprocess.run([*r1, "--accelerate-config", "deepspeed_zero2", "--output", str(tmp_path / "out"),
                        f"model={base}", "steps=2", "data.num_examples=16", "batch_size=4"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert out.count("[sft] DeepSpeed ZeRO-2 over 2 processes") == 1, out[-3000:]
    assert out.count("checkpoint:") == 1 and (tmp_path / "out" / "final" / "config.json").is_file()
    assert [r["num_processes"] for r in log(tmp_path / "out")] == [2, 2]
    bad = subprocess.run([*r1, "--accelerate-config", "zero9"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "r1: error: --accelerate-config: zero9 is not a file or a shipped config "
        "(ddp, deepspeed_zero2, deepspeed_zero3, fsdp2)"], bad.stderr
