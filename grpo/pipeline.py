"""Run a recipe's stages in order, each from the previous stage's checkpoint; resumable per stage (a stage
whose final checkpoint or result exists is skipped); ends with a report of every evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from grpo.checkpoint import atomic_dir
from grpo.config import RecipeConfig


def run(recipe: RecipeConfig, console: Console | None = None) -> list[tuple[str, dict]]:
    """Returns [(label, eval metrics)] for every eval stage, in order."""
    from grpo import evaluate, sft, trainer

    console = console or Console()
    out = Path(recipe.output_dir)
    current: str | None = None
    last_trained = "base"
    evals: list[tuple[str, dict]] = []
    for i, name in enumerate(recipe.stages):
        sec = recipe.sections[name]
        stage_dir = out / f"{i:02d}-{name}"
        model = sec.model or current
        console.rule(f"[bold]stage {i}: {name} ({sec.kind})")
        if sec.kind in ("sft", "grpo"):
            final = stage_dir / "final"
            if (final / "config.json").is_file():
                console.print(f"[{name}] done already: {final}")
            elif sec.kind == "sft":
                sft.train(sec, model, stage_dir, console)
            else:
                if model is None:
                    raise ValueError(f"stage {name}: no model (set {name}.model or run a training stage first)")
                trainer.train(sec, model, stage_dir, console)
            current, last_trained = str(final), name
        elif sec.kind == "eval":
            if model is None:
                raise ValueError(f"stage {name}: no model to evaluate")
            result_file = stage_dir / "eval" / "result.json"
            if result_file.is_file():
                metrics = json.loads(result_file.read_text())
            else:
                metrics = evaluate.evaluate(sec, model, console)
                atomic_dir(stage_dir / "eval", lambda d: (d / "result.json").write_text(json.dumps(metrics, indent=2)))
            label = f"after {last_trained}"
            evals.append((label, metrics))
            console.print(f"[{name}] {label}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if evals:
        report(recipe, evals, out, console)
    return evals


def report(recipe: RecipeConfig, evals: list[tuple[str, dict]], out: Path, console: Console) -> None:
    """Print the held-out table and write report.json next to the stages."""
    keys = [k for k in evals[0][1] if k not in ("problems", "samples")]
    table = Table(title=f"{recipe.name}: held-out evaluation ({evals[0][1]['problems']} problems x {evals[0][1]['samples'] // max(1, evals[0][1]['problems'])} samples)")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for label, m in evals:
        table.add_row(label, *[f"{m[k]:.3f}" if isinstance(m[k], float) else str(m[k]) for k in keys])
    console.print(table)
    if len(evals) >= 2 and "pass@1" in evals[0][1]:
        delta = 100 * (evals[-1][1]["pass@1"] - evals[0][1]["pass@1"])
        console.print(f"held-out accuracy (pass@1): {100 * evals[0][1]['pass@1']:.1f}% {evals[0][0]} -> "
                      f"{100 * evals[-1][1]['pass@1']:.1f}% {evals[-1][0]} ({delta:+.1f} points)")
    (out / "report.json").write_text(json.dumps([{"model": label, **m} for label, m in evals], indent=2))
