"""The built-in R1 recipes end to end, shortened to a few steps per stage (the full runs and their findings are in
the README): r1-tiny on r1kit's MoE/MLA model, then distill-tiny from its teacher, through the installed `r1`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

R1 = str(Path(sys.executable).parent / "r1")
EVAL = ["eval.benchmarks.held_out.num_examples=4", "eval.benchmarks.harder.num_examples=4", "eval.k=2",
        "eval.sampling.max_tokens=16"]
PRETRAIN = ["pretrain.steps=3", "pretrain.batch_size=8", "pretrain.data.num_examples=200"]
GRPO = ["steps=1", "prompts_per_step=2", "group_size=2", "sampling.max_tokens=16", "data.num_examples=16"]
# an untrained model's samples pass no keep rule: keep everything the shortened run samples, so SFT has traces
KEEP_ALL = ["keep={format: 0.0}", "dedup_threshold=null", "samples_per_prompt=2", "data.num_examples=4",
            "sampling.max_tokens=16",
            "filters={truncated: false, mixed_language: false, max_repetition: null, max_paragraph_chars: null}"]


def _run(cwd: Path, recipe: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1KIT_")}
    p = subprocess.run([R1, "run", recipe, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p


def test_r1_tiny_then_distill_tiny_shortened(tmp_path):
    """Every stage of both recipes runs, in order, on the MoE/MLA teacher and the dense student: the stage
    references (stage:NAME) resolve, the report is written, every training stage logs its compute."""
    p = _run(tmp_path, "r1-tiny", *PRETRAIN, *EVAL, "pretrain.train_tokenizer.vocab_size=300",
             *[f"{s}.{o}" for s in ("zero", "rl", "rl2") for o in GRPO],
             *[f"{s}.{o}" for s in ("cold_start_data", "rs") for o in KEEP_ALL],
             "cold_start.epochs=1", "sft2.epochs=1")
    run = tmp_path / "runs" / "r1-tiny"
    recipe = json.loads((run / "recipe.json").read_text())
    assert len(recipe["stages"]) == 14 and all((run / f"{i:02d}-{s}").is_dir() for i, s in enumerate(recipe["stages"]))
    config = json.loads((run / "12-rl2" / "final" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_routed_experts"] == 8 and config["kv_lora_rank"]
    for stage in ("00-pretrain", "02-zero", "05-cold_start", "07-rl", "10-sft2", "12-rl2"):
        last = json.loads((run / stage / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["compute/flops"] > 0, stage
    assert "after rl2" in p.stdout and (run / "report.md").is_file() and (run / "plots" / "grpo.png").is_file()

    p = _run(tmp_path, "distill-tiny", *PRETRAIN, *EVAL, *[f"rl.{o}" for o in GRPO],
             *[f"traces.{o}" for o in KEEP_ALL], "sft.epochs=1", "on_policy.steps=1", "on_policy.prompts_per_step=2",
             "on_policy.group_size=2", "on_policy.sampling.max_tokens=16", "on_policy.data.num_examples=8")
    run = tmp_path / "runs" / "distill-tiny"
    assert json.loads((run / "00-pretrain" / "final" / "config.json").read_text())["model_type"] == "llama"
    assert all(label in p.stdout for label in ("after rl", "after sft", "after on_policy"))
    assert (run / "report.md").is_file()
