"""Run a recipe's stages in order, each from the previous stage's checkpoint; resumable per stage (a stage
whose final checkpoint or result exists is skipped); ends with grpo.report.write_report (report.md, report.json,
plots/) from the run directory, where recipe.json (the resolved recipe) tells it each stage's kind."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from grpo.config import STAGES, ConfigError, RecipeConfig, stage_runner


def run(recipe: RecipeConfig, console: Console | None = None) -> list[tuple[str, dict]]:
    """Returns [(label, eval metrics)] for every eval stage, in order."""
    console = console or Console()
    out = Path(recipe.output_dir)
    current: str | None = None
    last_trained = "base"
    evals: list[tuple[str, dict]] = []
    out.mkdir(parents=True, exist_ok=True)  # the resolved recipe, for `r1 report` (each stage's kind and data)
    tmp = out / ".recipe.json.tmp"
    tmp.write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    os.replace(tmp, out / "recipe.json")
    dirs: dict[str, Path] = {}  # section name -> the directory of its latest run so far (stage:NAME references)
    for i, name in enumerate(recipe.stages):
        sec = resolve_refs(recipe.sections[name], dirs, name)
        spec = STAGES[sec.kind]
        stage_dir = dirs[name] = out / f"{i:02d}-{name}"
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
    if recipe.stages:
        from grpo.report import write_report

        write_report(out, console)  # report.md (the table of every eval, a line per stage, plots), report.json
    return evals


def resolve_refs(sec, dirs: dict[str, Path], name: str):
    """The section with `stage:NAME` resolved: in model, teacher and tokenizer, NAME's final checkpoint; in
    data.source, the dataset a reject stage NAME wrote. So a recipe's stages point at each other, not at paths
    under one output_dir (an override of output_dir then moves the whole run)."""
    def ref(value, field: str):
        if not (isinstance(value, str) and value.startswith("stage:")):
            return value
        if value[6:] not in dirs:
            raise ConfigError(f"{name}.{field}: {value} names no stage run before {name}")
        return str(dirs[value[6:]] / ("data/train.jsonl" if field == "data.source" else "final"))

    update = {f: ref(getattr(sec, f), f) for f in ("model", "teacher", "tokenizer") if hasattr(sec, f)}
    if getattr(sec, "data", None) is not None:
        update["data"] = sec.data.model_copy(update={"source": ref(sec.data.source, "data.source")})
    return sec.model_copy(update=update)
