"""`r1 report RUN_DIR`: report.md, report.json and PNG plots from a run directory that grpo/pipeline.py wrote.

A run directory holds one directory per stage, `NN-name` (NN its place in the recipe's `stages`), and recipe.json
(the resolved recipe, written by pipeline.run). report.md holds R1's Table 5 of every eval stage
(grpo.evaluate.render_report), one line per stage (steps, wall time, final reward or loss) and the plots in plots/:
grpo.png, sft.png, distill.png (training curves, one colour per stage), evals.png (held-out pass@1 and cons@k after
each eval stage) and moe.png (expert load balance, only when a stage logged it). What each shows: docs/report.md.

Simplifications: a stage's kind comes from recipe.json, else from its files (eval/result.json: eval, stats.json:
reject, metrics with "reward": grpo, with "reverse_kl" or without "epoch": distill, else sft; distill's sft mode
reads as sft); without recipe.json a single-dataset eval's benchmark name is read back from its result.md. Every
stage's curve starts at its own step 1 (stages of one kind share the x axis). GRPO curves of 50 steps or more are
drawn raw (faint) under a trailing moving average, and the figure's title says so. Eval labels follow pipeline.run:
"after <the last training stage before it>".
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: PNGs without a display, no pyplot state
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from grpo.config import STAGES, ConfigError, DataConfig

_STAGE_DIR = re.compile(r"(\d+)-(.+)")  # pipeline.run's f"{i:02d}-{name}"
_FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9}
DPI = 120


@dataclass
class Stage:
    """One stage directory as read back: its kind, metrics.jsonl rows and (eval) result.json."""

    index: int
    name: str  # the recipe section's name
    kind: str | None  # None: nothing written yet
    path: Path
    metrics: list[dict]
    result: dict | None = None
    label: str = ""  # eval: "after <stage>"
    bench: str = "held-out"  # eval: the column name of a single-dataset result

    @property
    def done(self) -> bool:
        return self.kind in STAGES and (self.path / STAGES[self.kind].done).is_file()


# ---------------------------------------------------------------- reading a run directory


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (a kill during a write) is dropped, a bad line elsewhere is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def _infer_kind(stage_dir: Path, name: str, metrics: list[dict]) -> str | None:
    """A stage's kind from what it wrote, for runs without recipe.json."""
    if (stage_dir / STAGES["eval"].done).is_file():
        return "eval"
    if (stage_dir / STAGES["reject"].done).is_file():
        return "reject"
    keys = set().union(*metrics) if metrics else set()
    if "reward" in keys:
        return "grpo"
    if "loss" in keys:
        return "distill" if "reverse_kl" in keys or "epoch" not in keys or name == "distill" else "sft"
    return None


def _bench_from_md(result_md: Path) -> str | None:
    """The benchmark of a single-dataset result.md: its table header reads `| Model | <bench> <metric> | ...`."""
    if not result_md.is_file():
        return None
    for line in result_md.read_text().splitlines():
        if line.startswith("| Model | "):
            cell = line.split(" | ")[1].replace("\\|", "|")
            return cell.rsplit(" ", 1)[0] if " " in cell else None
    return None


def load_run(run_dir: Path) -> tuple[str, list[Stage]]:
    """(run name, stages in order) of a run directory; a missing directory or one without stages is a ConfigError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    dirs = [d for d in run_dir.iterdir() if d.is_dir() and _STAGE_DIR.fullmatch(d.name)]
    if not dirs:
        raise ConfigError(f"{run_dir} holds no stage directories (NN-name, as `r1 run` writes them)")
    from grpo.evaluate import benchmark_name  # torch and the models: after the checks that need none
    recipe = _read_json(run_dir / "recipe.json") if (run_dir / "recipe.json").is_file() else {}
    sections = recipe.get("sections", {})
    stages, last_trained = [], "base"
    for d in sorted(dirs, key=lambda d: int(_STAGE_DIR.fullmatch(d.name)[1])):
        index, name = int(_STAGE_DIR.fullmatch(d.name)[1]), _STAGE_DIR.fullmatch(d.name)[2]
        sec = sections.get(name) or {}
        metrics = _read_metrics(d / "metrics.jsonl")
        stage = Stage(index, name, sec.get("kind") or _infer_kind(d, name, metrics), d, metrics)
        if stage.kind == "eval":
            stage.label = f"after {last_trained}"
            if stage.done:
                stage.result = _read_json(d / STAGES["eval"].done)
            try:
                stage.bench = benchmark_name(DataConfig.model_validate(sec["data"]))
            except (KeyError, TypeError, ValueError):  # no recipe.json (or an older one): the stage's own table
                stage.bench = _bench_from_md(d / "eval" / "result.md") or "held-out"
        elif stage.kind in STAGES and STAGES[stage.kind].chains:
            last_trained = name
        stages.append(stage)
    return recipe.get("name") or run_dir.name, stages


# ---------------------------------------------------------------- the held-out table (console, json, markdown)


def _write(path: Path, data: str | bytes) -> None:
    """Atomic: a kill leaves the previous file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def held_out(name: str, evals: list[tuple[str, dict]], names: list[str], out: Path, console: Console,
             extra_md: str = "") -> Path:
    """Print the held-out table and the pass@1 summary line; write report.json and report.md (R1's Table 5
    layout: a row per eval stage, a column per benchmark and metric, then `extra_md`). `names`: the column of each
    single-dataset result. Returns report.md."""
    from grpo.evaluate import per_benchmark, render_report

    title = f"{name}: held-out evaluation"
    rows = [(label, per_benchmark(m, bench)) for (label, m), bench in zip(evals, names)]
    if evals:
        flat = not any(m and all(isinstance(v, dict) for v in m.values()) for _, m in evals)  # flat: today's columns
        cells = [(label, {(None if flat else b, k): v for b, m in benches.items() for k, v in m.items()
                          if k not in ("problems", "samples")}) for label, benches in rows]
        columns = list(dict.fromkeys(c for _, row in cells for c in row))
        if not flat:  # several benchmarks: the console keeps R1's columns (report.md has every metric)
            columns = [c for c in columns if c[1].startswith(("pass@", "cons@"))]
        first = evals[0][1]
        size = ""
        if flat and "problems" in first:
            size = f" ({first['problems']} problems x {first['samples'] // max(1, first['problems'])} samples)"
        table = Table(title=title + size)
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
    _write(out / "report.json", json.dumps([{"model": label, **m} for label, m in evals], indent=2))
    md = render_report(title, rows) if rows else f"# {title}\n\nNo eval stage has finished yet.\n"
    _write(out / "report.md", md + ("\n" + extra_md if extra_md else ""))
    return out / "report.md"


# ---------------------------------------------------------------- plots


def _finite(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def moving_average(y: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v - (y[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _stage_label(s: Stage) -> str:
    return f"{s.path.name} ({s.kind})"


def _stage_legend(fig: Figure, stages: list[Stage]) -> None:
    """One legend entry per stage, below the panels, when there is more than one stage."""
    if len(stages) > 1:
        handles = [Line2D([], [], color=f"C{i % 10}", lw=2, label=_stage_label(s)) for i, s in enumerate(stages)]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(stages), 4), title="stage")


_STYLES = ["-", "--", ":", "-."]


def plot_curves(title: str, panels: list[tuple[str, list[str], str]], stages: list[Stage],
                smooth: bool = False) -> Figure | None:
    """A grid of panels (panel title, metric keys, y label) against step: one colour per stage, one line style per
    key; a panel whose keys no stage logged is left out. smooth: trailing moving average over the raw series."""
    panels = [(t, [k for k in keys if any(_finite(s.metrics, k)[0] for s in stages)], y) for t, keys, y in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    longest = max(len(s.metrics) for s in stages)
    window = max(2, longest // 20) if smooth and longest >= 50 else 1
    if len(stages) == 1:
        title += f": {stages[0].path.name}"
    if window > 1:
        title += f"\n(solid: trailing {window}-step moving average; faint: raw per-step values)"
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with rc_context(_FONT):
        fig = _figure(4.8 * ncols, 3.2 * nrows + (1.2 if len(stages) > 1 else 0.6))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (panel, keys, ylabel) in zip(axes, panels):
            values = []
            for si, s in enumerate(stages):
                for ki, key in enumerate(keys):
                    x, y = _finite(s.metrics, key)
                    if not x:
                        continue
                    values += y
                    style = dict(color=f"C{si % 10}", ls=_STYLES[ki % len(_STYLES)])
                    if window > 1:
                        ax.plot(x, y, alpha=0.25, lw=0.8, **style)
                        ax.plot(x, moving_average(y, window), lw=1.6, **style)
                    else:
                        ax.plot(x, y, lw=1.4, marker="o" if len(x) <= 30 else None, ms=3, **style)
            if min(values) > 0 and max(values) / min(values) > 30:  # a loss falling by orders of magnitude
                ax.set_yscale("log")
                ylabel += " (log scale)"
            if min(values) == max(values):  # a flat line reads as "no data" without this
                note = f"{values[0]:.4g} at every logged step" if len(values) > 1 else f"one step logged: {values[0]:.4g}"
                ax.text(0.5, 0.6, note, transform=ax.transAxes, ha="center", color="0.3")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(panel)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(keys) > 1:  # which line style is which key
                ax.legend(handles=[Line2D([], [], color="0.3", ls=_STYLES[i % len(_STYLES)], label=k)
                                   for i, k in enumerate(keys)], loc="best", framealpha=0.8)
        for ax in axes[len(panels):]:
            ax.remove()
        _stage_legend(fig, stages)
        fig.suptitle(title, fontsize=13)
    return fig


def _keys(stages: list[Stage], pattern: str) -> list[str]:
    """Logged keys matching `pattern`, in order of first appearance."""
    found = dict.fromkeys(k for s in stages for r in s.metrics for k in r if re.fullmatch(pattern, k))
    return list(found)


def plot_grpo(stages: list[Stage]) -> Figure | None:
    """Reward, each reward component, KL, entropy, completion length and clip ratios of GRPO stages."""
    components = [k.split("/")[1] for k in _keys(stages, r"rewards/[^/]+/mean")]
    panels = [("reward (weighted sum of the rewards)", ["reward"], "mean reward per completion")]
    panels += [(f"reward: {c}" + (" (fraction correct)" if c == "accuracy" else ""), [f"rewards/{c}/mean"],
                "mean over completions") for c in components]
    panels += [("KL to the reference policy", ["kl"], "nats / token"),
               ("policy entropy", ["entropy"], "nats / token"),
               ("completion length", ["completions/mean_length"], "tokens (mean)"),
               ("clipped importance ratios", _keys(stages, r"clip_ratio/.+"), "fraction of tokens")]
    return plot_curves("GRPO training", panels, stages, smooth=True)


def plot_sft(stages: list[Stage]) -> Figure | None:
    return plot_curves("SFT training", [("cross-entropy loss", ["loss", "eval_loss"], "nats / token")], stages)


def plot_distill(stages: list[Stage]) -> Figure | None:
    """grpo/distill.py logs loss (KD divergence, or the on-policy loss), reverse_kl and entropy (on-policy)."""
    panels = [("distillation loss", ["loss"], "nats / token"),
              ("reverse KL to the teacher (student samples)", ["reverse_kl"], "nats / token"),
              ("student entropy", ["entropy"], "nats / token"),
              ("completion length", ["completions/mean_length"], "tokens (mean)")]
    return plot_curves("Distillation training", panels, stages)


def plot_moe(stages: list[Stage]) -> Figure | None:
    """Expert load balance (max over mean routed tokens, averaged over MoE layers) of every stage that logged it."""
    logged = [s for s in stages if _keys([s], r"(.*/)?load_max_over_mean")]
    if not logged:
        return None
    with rc_context(_FONT):
        fig = _figure(7.5, 4.2)
        ax = fig.subplots()
        for si, s in enumerate(logged):
            for ki, key in enumerate(_keys([s], r"(.*/)?load_max_over_mean")):
                x, y = _finite(s.metrics, key)
                ax.plot(x, y, color=f"C{si % 10}", ls=_STYLES[ki % len(_STYLES)], lw=1.4,
                        marker="o" if len(x) <= 30 else None, ms=3, label=_stage_label(s))
        ax.axhline(1.0, color="0.5", ls=":", lw=1)
        ax.set_title("MoE expert load: busiest expert / mean expert (mean over MoE layers; 1 = balanced)")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("max / mean routed tokens per expert")
        ax.grid(alpha=0.3)
        if len(logged) > 1:
            ax.legend(loc="best", framealpha=0.8)
    return fig


def plot_evals(evals: list[tuple[str, dict[str, dict]]], name: str = "") -> Figure | None:
    """Grouped bars: a group per eval stage (label, {benchmark: metrics}), a bar per benchmark's pass@1 and cons@k,
    in percent, each bar labelled with its value."""
    series = list(dict.fromkeys((b, m) for _, benches in evals for b, ms in benches.items() for m in ms
                                if m == "pass@1" or re.fullmatch(r"cons@\d+", m)))
    if not series:
        return None
    bench_names = list(dict.fromkeys(b for b, _ in series))
    several = len(bench_names) > 1
    width = 0.8 / len(series)
    with rc_context(_FONT):
        fig = _figure(max(6.5, 2.0 + len(evals) * (0.55 * len(series) + 0.6)), 4.6)
        ax = fig.subplots()
        for j, (b, m) in enumerate(series):
            heights = [100 * benches.get(b, {}).get(m, float("nan")) for _, benches in evals]
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(evals))]
            bars = ax.bar(xs, heights, width * 0.95, color=f"C{j % 10}", label=f"{b} {m}" if several else m)
            ax.bar_label(bars, labels=[f"{h:.1f}" if math.isfinite(h) else "" for h in heights], padding=2, fontsize=9)
        ax.set_xticks(range(len(evals)), [label for label, _ in evals])
        ax.set_ylim(0, 110)
        ax.set_ylabel("% of held-out problems")
        ax.set_xlabel("model")
        on = "" if several else f" on {bench_names[0]}"
        ax.set_title(f"{name + ': ' if name else ''}held-out pass@1 and cons@k{on} after each stage")
        ax.grid(axis="y", alpha=0.3)
        fig.legend(loc="outside lower center", ncols=min(4, len(ax.containers)), title="metric")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- the report


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def stage_line(s: Stage, run_dir: Path) -> str:
    """One markdown line: steps, wall time (the sum of the logged step times), final reward or loss."""
    head = f"- `{s.path.name}` ({s.kind or 'nothing written yet'})"
    if s.kind == "eval":
        where = (s.path / STAGES["eval"].done).relative_to(run_dir)
        return head + (f": {s.label}, `{where}`" if s.result is not None else f": {s.label}, not finished")
    if s.kind == "reject":
        return head + f": `{(s.path / STAGES['reject'].done).relative_to(run_dir)}`"
    if not s.metrics:
        return head + ("" if s.kind is None else ": no metrics logged")
    steps = s.metrics[-1].get("step", len(s.metrics))
    parts = [f"{steps} step{'s' if steps != 1 else ''}"]
    for key in ("time/step", "step_time"):
        times = _finite(s.metrics, key)[1]
        if times:
            parts.append(f"wall time {_duration(sum(times))} (sum of {key})")
            break
    flops = _finite(s.metrics, "compute/flops")[1]
    if flops:  # the stage's own estimate: 6N per trained token, 2N per forward-only token (grpo.accel.active_params)
        parts.append(f"{flops[-1]:.3g} training FLOPs")
    for key in ("reward", "loss", "eval_loss", "reverse_kl"):
        y = _finite(s.metrics, key)[1]
        if y and (key != "loss" or s.kind != "grpo"):
            tail = y[-10:]
            parts.append(f"final {key} {y[-1]:.4g}" + (f" (mean of the last {len(tail)} steps {sum(tail) / len(tail):.4g})"
                                                       if key == "reward" and len(tail) > 1 else ""))
    return head + ": " + ", ".join(parts) + ("" if s.done else " (not finished)")


def write_report(run_dir: Path, console: Console | None = None) -> Path:
    """Write report.md, report.json and plots/*.png into `run_dir`; print the held-out table and the paths."""
    console = console or Console()
    run_dir = Path(run_dir)
    name, stages = load_run(run_dir)
    from grpo.evaluate import per_benchmark

    evals = [s for s in stages if s.kind == "eval" and s.result is not None]
    plots_dir = run_dir / "plots"
    figures = []
    for kind, plot, what in (("grpo", plot_grpo, "GRPO"), ("sft", plot_sft, "SFT"), ("distill", plot_distill, "Distillation")):
        fig = plot([s for s in stages if s.kind == kind and s.metrics])
        if fig is not None:
            figures.append((f"{kind}.png", f"{what} training curves", fig))
    fig = plot_evals([(s.label, per_benchmark(s.result, s.bench)) for s in evals], name)
    if fig is not None:
        figures.append(("evals.png", "Held-out pass@1 and cons@k after each eval stage", fig))
    fig = plot_moe([s for s in stages if s.metrics])
    if fig is not None:
        figures.append(("moe.png", "MoE expert load balance", fig))
    written = []
    if figures:
        plots_dir.mkdir(exist_ok=True)
        written = [_save(fig, plots_dir / file) for file, _, fig in figures]
    md = ["## Stages", ""] + [stage_line(s, run_dir) for s in stages] + [""]
    if figures:
        md += ["## Training curves", ""]
        for file, caption, _ in figures:
            md += [f"![{caption}](plots/{file})", ""]
    report = held_out(name, [(s.label, s.result) for s in evals], [s.bench for s in evals], run_dir, console,
                      "\n".join(md))
    for path in [report, run_dir / "report.json", *written]:
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)  # a path kept on one line
    return report
