"""The README's commands are true as written: every command in its Quick start and "Running stages and recipes"
blocks runs here through the installed `r1` entry point, in a fresh directory. Training commands get overrides
that shrink their step counts (the full main job is what `r1 run r1-zero-tiny` does; its numbers are in the
README), and each command's output is checked for what the README says it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
R1 = str(Path(sys.executable).parent / "r1")
# a few steps per stage, a tiny tokenizer corpus and eval set: the same stages and code paths as the main job
SHRINK = ["pretrain.steps=3", "pretrain.data.num_examples=300", "pretrain.train_tokenizer.vocab_size=300",
          "pretrain.batch_size=8", "eval.data.num_examples=4", "eval.k=2", "grpo.steps=1", "grpo.prompts_per_step=2",
          "grpo.group_size=2", "grpo.save_every=0", "grpo.sampling.max_tokens=16", "eval.sampling.max_tokens=16"]


def _block(heading: str) -> list[str]:
    """The command lines of the first code block under a README heading (comments and `$ ` prompts removed)."""
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def _r1(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1KIT_")}
    p = subprocess.run([R1, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, (args, p.stdout[-3000:], p.stderr[-3000:])
    return p


def test_quick_start_commands_are_the_ones_ci_runs():
    """Quick start: install then the main job, install then the suite; .ci/run runs exactly the second."""
    assert _block("## Quick start") == ["./setup.sh && .venv/bin/r1 run r1-zero-tiny",
                                        "./setup.sh && .venv/bin/python -m pytest -q"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./setup.sh && .venv/bin/python -m pytest -q" in ci and (REPO / "setup.sh").stat().st_mode & 0o111
    assert Path(R1).is_file()  # the console script setup.sh installs


def test_stage_commands_run_as_written(tmp_path):
    lines = _block("## Running stages and recipes")
    assert lines == [
        "r1 run r1-zero-tiny",
        "r1 run my-recipe.yaml grpo.steps=100 eval.k=8",
        "r1 grpo my-recipe.yaml model=runs/r1-zero-tiny/00-pretrain/final --output runs/grpo",
        "r1 eval my-recipe.yaml model=runs/grpo/final k=8",
        "r1 sft stage.yaml",
        "r1 report runs/r1-zero-tiny",
        "r1 rewards list",
        "r1 rewards score --reward accuracy,format --data completions.jsonl",
        "r1 serve MODEL [--tensor-parallel-size N]",
    ], "the README's stage block changed: update this test to run the new commands"

    # r1 run r1-zero-tiny: every stage, the table and the summary line
    p = _r1(tmp_path, "run", "r1-zero-tiny", *SHRINK)
    assert "held-out accuracy (pass@1):" in p.stdout and "after pretrain" in p.stdout and "after grpo" in p.stdout
    pretrain = tmp_path / "runs" / "r1-zero-tiny" / "00-pretrain" / "final"
    assert (pretrain / "config.json").is_file() and (tmp_path / "runs" / "r1-zero-tiny" / "report.json").is_file()

    # r1 run my-recipe.yaml ...: a recipe file with dotted overrides; the same name resumes, every stage done
    recipe = yaml.safe_load((REPO / "recipes" / "r1-zero-tiny.yaml").read_text())
    for ov in SHRINK:
        key, value = ov.split("=")
        *parents, last = key.split(".")
        node = recipe
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    (tmp_path / "my-recipe.yaml").write_text(yaml.safe_dump(recipe))
    p = _r1(tmp_path, "run", "my-recipe.yaml", "grpo.steps=100", "eval.k=8")
    assert p.stdout.count("done already") == 4 and "held-out accuracy (pass@1):" in p.stdout

    # r1 grpo RECIPE model=... --output ...: one stage, bare keys go to that stage
    p = _r1(tmp_path, "grpo", "my-recipe.yaml", "model=runs/r1-zero-tiny/00-pretrain/final", "--output", "runs/grpo")
    assert "checkpoint: runs/grpo/final" in p.stdout and (tmp_path / "runs/grpo/final/config.json").is_file()

    # r1 eval RECIPE model=... k=8 (shrunk to k=2 with the recipe's 4 problems)
    p = _r1(tmp_path, "eval", "my-recipe.yaml", "model=runs/grpo/final", "k=2")
    assert re.search(r"^pass@1: \d\.\d{4}$", p.stdout, re.M) and "cons@2" in p.stdout

    # r1 sft stage.yaml: a bare stage file
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump({
        "model": "runs/grpo/final", "steps": 2, "batch_size": 4,
        "data": {"source": "synthetic:arith", "num_examples": 50, "completion_column": "solution"}}))
    p = _r1(tmp_path, "sft", "stage.yaml")
    assert "checkpoint: runs/sft/final" in p.stdout and (tmp_path / "runs/sft/final/config.json").is_file()

    # r1 report RUN_DIR: the run above's report and plots, rebuilt
    p = _r1(tmp_path, "report", "runs/r1-zero-tiny")
    assert "held-out accuracy (pass@1):" in p.stdout
    assert all((tmp_path / "runs/r1-zero-tiny/plots" / f).is_file() for f in ("grpo.png", "sft.png", "evals.png"))

    # r1 rewards list / score
    p = _r1(tmp_path, "rewards", "list")
    assert all(name in p.stdout for name in ("accuracy", "format", "language", "code"))
    rows = [{"completion": "<think>2 + 2 = 4</think> <answer>4</answer>", "answer": "4"},
            {"completion": "<answer>5</answer>", "answer": "4"}]
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = _r1(tmp_path, "rewards", "score", "--reward", "accuracy,format", "--data", "completions.jsonl")
    assert "accuracy" in p.stdout and "format" in p.stdout and "0.5" in p.stdout

    # r1 serve MODEL [--tensor-parallel-size N]: the real server (one process and tensor parallel) runs in
    # tests/test_rollout_server.py; here its command line answers
    p = _r1(tmp_path, "serve", "--help")
    assert ("MODEL" in p.stdout or "model" in p.stdout) and "--tensor-parallel-size" in p.stdout

    # The R1 stages, with the stage files the README shows (written here as it gives them)
    assert _block("## The R1 stages") == [
        "r1 reject reject.yaml model=runs/grpo/final --output runs/rs",
        "r1 sft traces.yaml",
        "r1 distill distill.yaml",
        "r1 eval my-recipe.yaml model=runs/distill/final k=8",
    ], "the README's R1-stage block changed: update this test to run the new commands"
    section = (REPO / "README.md").read_text().split("## The R1 stages", 1)[1].split("\n## ", 1)[0]
    for name, body in re.findall(r"```yaml\n# (\S+\.yaml)[^\n]*\n(.*?)```", section, re.S):
        (tmp_path / name).write_text(body)
    assert {"reject.yaml", "traces.yaml", "distill.yaml"} <= {f.name for f in tmp_path.iterdir()}
    # shrunk: a 1-step policy passes R1's keep rule on few samples, so every scored sample is kept here
    p = _r1(tmp_path, "reject", "reject.yaml", "model=runs/grpo/final", "--output", "runs/rs", "samples_per_prompt=2",
            "data.num_examples=6", "sampling.max_tokens=16", "keep={}", "filters.truncated=false")
    stats = json.loads((tmp_path / "runs/rs/stats.json").read_text())
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["samples"] == 12
    assert (tmp_path / "runs/rs/data/train.jsonl").is_file() and "[reject] kept" in p.stdout
    p = _r1(tmp_path, "sft", "traces.yaml", "epochs=1", "batch_size=4")
    assert "checkpoint: runs/sft/final" in p.stdout
    p = _r1(tmp_path, "distill", "distill.yaml", "steps=2", "data.num_examples=8", "prompts_per_step=2",
            "group_size=2", "sampling.max_tokens=16")
    assert "checkpoint: runs/distill/final" in p.stdout and (tmp_path / "runs/distill/final/config.json").is_file()
    p = _r1(tmp_path, "eval", "my-recipe.yaml", "model=runs/distill/final", "k=2")
    assert re.search(r"^pass@1: \d\.\d{4}$", p.stdout, re.M)
    assert (tmp_path / "runs/r1-zero-tiny/eval/eval/result.md").is_file()  # <recipe output_dir>/<stage>


def test_readme_error_examples_are_what_r1_prints():
    """The README quotes one-line errors (a misspelt override, a missing model); r1 prints exactly those lines."""
    text = (REPO / "README.md").read_text()
    examples = re.findall(r"^\$ (r1 .*)\n(r1: error: .*)$", text, re.M)
    assert len(examples) >= 2
    for cmd, line in examples:
        p = _r1(REPO, *cmd.split()[1:], ok=False)
        assert p.returncode == 2 and p.stderr.strip() == line, cmd
