"""`r1 report`: report.md, report.json and the PNG plots from a run directory. The fake run directory holds the
files the real stages write, with their keys (grpo/sft.py's, grpo/trainer.py's and grpo/evaluate.py's metric dicts):
2 GRPO stages (the second with the DeepSeek model's expert-load key), 1 SFT stage and 3 evals."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from grpo import report
from grpo.config import ConfigError, load_recipe
from grpo.evaluate import per_benchmark, render_report

REPO = Path(__file__).resolve().parents[1]
PASS1 = [0.175, 0.5, 0.75]  # after pretrain, after grpo, after grpo2
CONS4 = [0.09, 0.55, 0.8]


def _sft_row(step: int, eval_every: int = 5) -> dict:
    """grpo/sft.py's metrics line."""
    m = {"step": step, "epoch": step * 8 / 300, "loss": 6.0 * 0.8 ** step, "grad_norm": 1.0, "learning_rate": 1e-3,
         "examples": 8, "tokens": 260, "padded_tokens": 20}
    if step % eval_every == 0:
        m["eval_loss"] = 6.5 * 0.8 ** step
    m["step_time"] = 0.5
    return m


def _grpo_row(step: int, offset: float, moe: bool, entropy: bool = True) -> dict:
    """grpo/trainer.py's metrics line for the rewards accuracy and format (RewardSet.metrics keys)."""
    m = {"step": step, "reward": offset + 0.01 * step, "reward_std": 0.5, "frac_reward_zero_std": 0.1}
    for name, v in (("accuracy", 0.2 + 0.005 * step), ("format", 0.3 + 0.005 * step)):
        m.update({f"rewards/{name}/mean": v, f"rewards/{name}/std": 0.4, f"rewards/{name}/none_frac": 0.0,
                  f"rewards/{name}/errors": 0.0, f"rewards/{name}/timeouts": 0.0})
    m.update({"nonfinite/skipped": 0.0, "loss": 0.01, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.01 * (step % 3),
              "clip_ratio/region_mean": 0.01 * (step % 3), "kl": 0.001 * step})
    if entropy:
        m["entropy"] = 0.1
    if moe:  # trainer.py logs f"moe/{k}" for each key of DeepSeekV3ForCausalLM.update_expert_bias()
        m.update({"moe/moe/load_max_over_mean/0": 2.0 - step / 100, "moe/moe/load_max_over_mean": 1.8 - step / 100})
    m.update({"rollout/logprob_abs_diff": 1e-7, "grad_norm": 0.4, "learning_rate": 1e-4, "completions/mean_length": 22.0,
              "completions/min_length": 12.0, "completions/max_length": 28.0, "completions/clipped_ratio": 0.0,
              "time/generate": 0.6, "time/reward": 0.01, "time/ref": 0.2, "time/old": 0.0, "time/update": 0.5,
              "time/weight_sync": 0.0, "time/step": 1.25, "num_processes": 1})
    return m


def _eval_result(p1: float, c4: float) -> dict:
    """grpo/evaluate.py's _score keys for k=4, pass_at [1, 4] and the accuracy and format rewards."""
    return {"problems": 16, "samples": 64, "pass@1": p1, "pass@4": min(1.0, p1 + 0.2), "cons@4": c4, "format": 0.9,
            "last_number_acc": 0.8, "mean_length": 21.5}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval_stage(d: Path, p1: float, c4: float) -> None:
    """What grpo/evaluate.py:run leaves: eval/result.json and eval/result.md (benchmark arith)."""
    (d / "eval").mkdir(parents=True)
    metrics = _eval_result(p1, c4)
    (d / "eval" / "result.json").write_text(json.dumps(metrics, indent=2))
    (d / "eval" / "result.md").write_text(render_report("Evaluation", [("m", per_benchmark(metrics, "arith"))]))


def _final(d: Path) -> None:
    (d / "final").mkdir()
    (d / "final" / "config.json").write_text("{}")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """pretrain (sft), eval, grpo, eval, grpo2 (MoE, no entropy), eval; no recipe.json (as runs before it)."""
    run = tmp_path / "run"
    _jsonl(run / "00-pretrain" / "metrics.jsonl", [_sft_row(s) for s in range(1, 21)])
    _final(run / "00-pretrain")
    _eval_stage(run / "01-eval", PASS1[0], CONS4[0])
    _jsonl(run / "02-grpo" / "metrics.jsonl", [_grpo_row(s, 0.5, moe=False) for s in range(1, 61)])
    _final(run / "02-grpo")
    _eval_stage(run / "03-eval", PASS1[1], CONS4[1])
    _jsonl(run / "04-grpo2" / "metrics.jsonl", [_grpo_row(s, 1.0, moe=True, entropy=False) for s in range(1, 41)])
    _final(run / "04-grpo2")
    _eval_stage(run / "05-eval", PASS1[2], CONS4[2])
    return run


def test_report_writes_table_stage_lines_and_linked_pngs(run_dir):
    """~3 s (the first matplotlib figures)."""
    console = Console(record=True, width=200)
    md_path = report.write_report(run_dir, console)
    md = md_path.read_text()
    assert md_path == run_dir / "report.md"
    assert "| after pretrain | 17.5 | 37.5 | 9.0 |" in md and "| after grpo2 | 75.0 | 95.0 | 80.0 |" in md
    assert "| Model | arith pass@1 | arith pass@4 | arith cons@4 |" in md  # the benchmark name, from result.md
    assert "- `00-pretrain` (sft): 20 steps, wall time 10.0 s (sum of step_time), final loss" in md
    assert "- `02-grpo` (grpo): 60 steps, wall time 75.0 s (sum of time/step), final reward 1.1 " in md
    assert "- `03-eval` (eval): after grpo, `03-eval/eval/result.json`" in md
    pngs = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert pngs == ["evals.png", "grpo.png", "moe.png", "sft.png"]
    assert "## Training curves" in md
    for name in pngs:
        assert f"](plots/{name})" in md
        with Image.open(run_dir / "plots" / name) as im:
            im.verify()
        with Image.open(run_dir / "plots" / name) as im:
            assert im.format == "PNG" and 500 <= im.width <= 2500 and 300 <= im.height <= 2500, im.size
    assert json.loads((run_dir / "report.json").read_text())[2] == {"model": "after grpo2", **_eval_result(PASS1[2], CONS4[2])}
    text = console.export_text()
    assert "held-out accuracy (pass@1): 17.5% after pretrain -> 75.0% after grpo2 (+57.5 points)" in text
    assert f"wrote {run_dir / 'plots' / 'moe.png'}" in text


def test_figures_hold_the_values_labels_and_one_legend_entry_per_stage(run_dir):
    name, stages = report.load_run(run_dir)
    assert name == "run" and [s.kind for s in stages] == ["sft", "eval", "grpo", "eval", "grpo", "eval"]
    evals = [s for s in stages if s.kind == "eval"]
    fig = report.plot_evals([(s.label, per_benchmark(s.result, s.bench)) for s in evals], name)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]  # bars of pass@1 (one per eval), then of cons@4
    assert heights == pytest.approx([100 * v for v in PASS1 + CONS4])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["after pretrain", "after grpo", "after grpo2"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pass@1", "cons@4"]
    assert ax.get_ylabel() == "% of held-out problems" and "pass@1 and cons@k on arith" in ax.get_title()
    assert "75.0" in [t.get_text() for t in ax.texts]  # the values printed on the bars

    grpo = [s for s in stages if s.kind == "grpo"]
    fig = report.plot_grpo(grpo)
    titles = [a.get_title() for a in fig.axes]
    assert titles[:3] == ["reward (weighted sum of the rewards)", "reward: accuracy (fraction correct)", "reward: format"]
    assert "policy entropy" in titles and "clipped importance ratios" in titles
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["02-grpo (grpo)", "04-grpo2 (grpo)"]
    assert all(a.get_xlabel() == "step" and a.get_ylabel() for a in fig.axes)
    assert "3-step moving average" in fig.get_suptitle() and "faint: raw" in fig.get_suptitle()
    reward = fig.axes[0]
    assert len(reward.lines) == 4  # per stage: the raw series and its moving average
    assert reward.lines[0].get_ydata()[-1] == pytest.approx(0.5 + 0.6)  # raw: the last logged reward of 02-grpo

    only_second = report.plot_grpo(grpo[1:])  # 04-grpo2 logged no entropy: no empty panel for it
    assert "policy entropy" not in [a.get_title() for a in only_second.axes] and not only_second.legends

    sft = report.plot_sft([s for s in stages if s.kind == "sft"])
    ax = sft.axes[0]
    assert ax.get_yscale() == "log" and [len(line.get_xdata()) for line in ax.lines] == [20, 4]  # loss, eval_loss
    moe = report.plot_moe(stages)
    curves = [line for line in moe.axes[0].lines if len(line.get_xdata()) > 2]  # not the "balanced" line at 1
    assert [line.get_ydata()[0] for line in curves] == [pytest.approx(1.79)]  # the mean over layers only
    assert report.plot_moe(grpo[:1]) is None and report.plot_distill([]) is None


def test_recipe_json_names_kinds_and_benchmarks(run_dir, tmp_path):
    """recipe.json (pipeline.run writes it) decides: 04-grpo2 as a section of kind grpo, the eval data's name."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: mine\nstages: [pretrain, eval, grpo, eval, grpo2, eval]\npretrain: {steps: 20}\n"
                      "eval: {data: {source: 'hf:openai/gsm8k'}}\ngrpo: {steps: 2}\ngrpo2: {kind: grpo}\n")
    (run_dir / "recipe.json").write_text(json.dumps(load_recipe(str(recipe)).model_dump(mode="json")))
    name, stages = report.load_run(run_dir)
    assert name == "mine" and [s.bench for s in stages if s.kind == "eval"] == ["gsm8k"] * 3
    md = report.write_report(run_dir, Console(file=io.StringIO())).read_text()
    assert "# mine: held-out evaluation" in md and "| Model | gsm8k pass@1 |" in md


def test_torn_metrics_line_is_dropped_and_bad_input_is_one_line(run_dir, tmp_path):
    with (run_dir / "02-grpo" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 61, "rew')  # a kill during a write
    assert len(report.load_run(run_dir)[1][2].metrics) == 60
    (run_dir / "00-pretrain" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"00-pretrain/metrics.jsonl: line 2 is not valid JSON"):
        report.load_run(run_dir)
    for bad, says in ((tmp_path / "missing", "does not exist"), (tmp_path, "holds no stage directories")):
        p = subprocess.run([sys.executable, "-m", "grpo.cli", "report", str(bad)], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
        assert p.stderr.startswith("r1: error: ") and str(bad) in p.stderr and says in p.stderr


def test_cli_report_prints_table_and_paths(run_dir, capsys):
    from grpo.cli import main

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "grpo2" in out and f"wrote {run_dir / 'report.md'}" in out


def test_pipeline_run_writes_recipe_json_report_and_plots(tmp_path):
    """~15 s: r1-zero-tiny shrunk to seconds (as tests/test_readme.py runs it), then the report it ends with."""
    from grpo import pipeline

    shrink = ["pretrain.steps=3", "pretrain.data.num_examples=300", "pretrain.train_tokenizer.vocab_size=300",
              "pretrain.batch_size=8", "eval.data.num_examples=4", "eval.k=2", "grpo.steps=2", "grpo.prompts_per_step=2",
              "grpo.group_size=2", "grpo.save_every=0", "grpo.sampling.max_tokens=16", "eval.sampling.max_tokens=16",
              f"output_dir={tmp_path / 'run'}"]
    pipeline.run(load_recipe("r1-zero-tiny", shrink), Console(file=io.StringIO()))
    run = tmp_path / "run"
    assert json.loads((run / "recipe.json").read_text())["sections"]["grpo"]["kind"] == "grpo"
    md = (run / "report.md").read_text()
    assert "| after pretrain |" in md and "| Model | arith pass@1 |" in md
    assert all(f"](plots/{p}.png)" in md and (run / "plots" / f"{p}.png").is_file() for p in ("sft", "grpo", "evals"))
    assert "- `02-grpo` (grpo): 2 steps" in md and not math.isnan(json.loads((run / "report.json").read_text())[1]["pass@1"])


def test_distill_panels_are_the_keys_distill_logs(tmp_path):
    """grpo/distill.py on_policy (advantage form) logs loss, reverse_kl, entropy and completion length; kd logs loss."""
    rows = [{"step": s, "loss": 1.0 / s, "reverse_kl": 0.5 / s, "entropy": 0.3, "tokens": 40,
             "completions/mean_length": 20.0, "grad_norm": 1.0, "learning_rate": 1e-4, "step_time": 0.2} for s in range(1, 11)]
    _jsonl(tmp_path / "run" / "00-distill" / "metrics.jsonl", rows)
    _, stages = report.load_run(tmp_path / "run")
    assert stages[0].kind == "distill"  # no "epoch": not sft
    fig = report.plot_distill(stages)
    assert [a.get_title() for a in fig.axes] == ["distillation loss", "reverse KL to the teacher (student samples)",
                                                 "student entropy", "completion length"]
    assert fig.get_suptitle() == "Distillation training: 00-distill"
