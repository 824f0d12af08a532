"""Run a recipe's stages in order, each from the previous stage's checkpoint; resumable per stage (a stage
whose final checkpoint or result exists is skipped); ends with a report of every evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from grpo.config import STAGES, ConfigError, RecipeConfig, stage_runner


def run(recipe: RecipeConfig, console: Console | None = None) -> list[tuple[str, dict]]:
    """Returns [(label, eval metrics)] for every eval stage, in order."""
    console = console or Console()
    out = Path(recipe.output_dir)
    current: str | None = None
    last_trained = "base"
    evals: list[tuple[str, dict]] = []
    for i, name in enumerate(recipe.stages):
        sec = recipe.sections[name]
        spec = STAGES[sec.kind]
        stage_dir = out / f"{i:02d}-{name}"
        model = sec.model or current
        console.rule(f"[bold]stage {i}: {name} ({sec.kind})")
        if spec.needs_model and model is None:
            raise ConfigError(f"stage {name}: no model (set {name}.model or run a training stage first)")
        done = stage_dir / spec.done
        if done.is_file():
            console.print(f"\\[{name}] done already: {done.parent if spec.chains else done}")
        else:
            stage_runner(sec.kind)(sec, model, stage_dir, console)
        if spec.chains:
            current, last_trained = str(stage_dir / "final"), name
        if sec.kind == "eval":
            metrics = json.loads(done.read_text())
            label = f"after {last_trained}"
            evals.append((label, metrics))
            console.print(f"\\[{name}] {label}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if evals:
        report(recipe, evals, out, console)
    return evals


def report(recipe: RecipeConfig, evals: list[tuple[str, dict]], out: Path, console: Console) -> None:
    """Print the held-out table and summary line; write report.json and report.md (R1's Table 5 layout: a row per
    eval stage, a column per benchmark and metric) next to the stages."""
    from grpo.evaluate import benchmark_name, per_benchmark, render_report

    # a single-dataset result has flat keys: its column is named after the data of the eval section it came from
    sections = [recipe.sections[s] for s in recipe.stages if recipe.sections[s].kind == "eval"]
    names = [benchmark_name(sec.data) for sec in sections] if len(sections) == len(evals) else ["held-out"] * len(evals)
    rows = [(label, per_benchmark(m, name)) for (label, m), name in zip(evals, names)]
    flat = not any(m and all(isinstance(v, dict) for v in m.values()) for _, m in evals)  # flat: today's columns
    cells = [(label, {(None if flat else b, k): v for b, m in benches.items() for k, v in m.items()
                      if k not in ("problems", "samples")}) for label, benches in rows]
    columns = list(dict.fromkeys(c for _, row in cells for c in row))
    first = evals[0][1]
    size = ""
    if flat and "problems" in first:
        size = f" ({first['problems']} problems x {first['samples'] // max(1, first['problems'])} samples)"
    table = Table(title=f"{recipe.name}: held-out evaluation{size}")
    table.add_column("model")
    for b, k in columns:
        table.add_column(k if b is None else f"{b} {k}", justify="right")
    for label, row in cells:
        table.add_row(label, *[f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)
                               for v in (row.get(c) for c in columns)])
    console.print(table)
    if len(rows) >= 2:
        (label0, before), (label1, after) = rows[0], rows[-1]
        shared = [b for b in before if b in after and "pass@1" in before[b] and "pass@1" in after[b]]
        for b in shared:  # the first and the last evaluation of the same benchmark
            on = "" if len(shared) == 1 else f" on {b}"
            p0, p1 = before[b]["pass@1"], after[b]["pass@1"]
            console.print(f"held-out accuracy (pass@1){on}: {100 * p0:.1f}% {label0} -> {100 * p1:.1f}% {label1} "
                          f"({100 * (p1 - p0):+.1f} points)")
    (out / "report.json").write_text(json.dumps([{"model": label, **m} for label, m in evals], indent=2))
    (out / "report.md").write_text(render_report(f"{recipe.name}: held-out evaluation", rows))
