"""GRPO data parallel: a real 2-process gloo run under torchrun (accelerate wraps the policy in DDP)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_two_process_grpo(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    overrides = [f"grpo.model={base}", "grpo.data.num_examples=32", "grpo.group_size=4", "grpo.prompts_per_step=4",
                 "grpo.steps=3", "grpo.save_every=2", "grpo.sampling.max_tokens=12", "grpo.learning_rate=1e-3",
                 "grpo.micro_batch_size=3", "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tests.helpers:length_reward'}]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "grpo.cli", "grpo",
                        "recipes/r1-zero-tiny.yaml", *overrides, "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 logs once per step
    assert all(r["num_processes"] == 2 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # every rank ended with the same weights (the trainer checks this before saving), and they moved
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    assert (tmp_path / "out" / "last" / "trainer_state" / "state.pt").is_file()
    state = torch.load(tmp_path / "out" / "last" / "trainer_state" / "state.pt", weights_only=False)["state"]
    assert (state["step"], state["cursor"]) == (2, 8)  # the global batch (4 prompts) advanced the shared cursor twice
