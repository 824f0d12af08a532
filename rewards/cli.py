"""`r1 rewards list` and `r1 rewards score --reward NAME[,NAME] --data file.jsonl`: debug rewards before training.

`score` reads JSONL rows with a completion (field `completion`, a string or chat-message list), an optional
`prompt`, and any other columns (answer, tests, lang, ...), which are passed to the rewards as columns. It
prints per reward: mean, std, Nones, timeouts, errors and other counters, then a few example rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import rewards
from rewards._text import completion_text
from rewards.runner import RewardSet


def _doc(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""


def cmd_list(console: Console) -> int:
    table = Table(title="r1kit rewards")
    table.add_column("name", style="bold")
    table.add_column("from")
    table.add_column("what")
    for name in rewards.names():
        try:
            fn = rewards.get(name)
            table.add_row(name, fn.__module__, escape(_doc(fn)))
        except Exception as e:  # a broken third-party entry point is shown, not fatal
            table.add_row(name, "?", f"[red]cannot load: {e}[/red]")
    console.print(table)
    console.print("Recipes may also name `package.module:function` or `path/to/file.py:function`.")
    return 0


def cmd_score(args, console: Console) -> int:
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    if not rows:
        console.print(f"[red]{args.data} has no rows[/red]")
        return 2
    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    specs = [{"name": n.strip(), "kwargs": kwargs.get(n.strip(), {})} for n in args.reward.split(",") if n.strip()]
    rs = RewardSet.from_specs(specs)
    completions = [r.get(args.completion_field) for r in rows]
    prompts = [r.get(args.prompt_field, "") for r in rows]
    skip = {args.completion_field, args.prompt_field}
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r) if k not in skip}
    total, per = rs(completions, prompts, **columns)
    m = rs.metrics(per)
    table = Table(title=f"{len(rows)} rows from {args.data}")
    for col in ("reward", "mean", "std", "n", "None", "timeouts", "errors", "other counters"):
        table.add_column(col, justify="left" if col in ("reward", "other counters") else "right")
    for label in rs.labels:
        scores = per[label]
        counts = per.counts.get(label, {})
        other = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k not in ("timeouts", "errors"))
        table.add_row(label, f"{m[f'rewards/{label}/mean']:.4f}", f"{m[f'rewards/{label}/std']:.4f}",
                      str(len(scores)), str(sum(s is None for s in scores)), str(counts.get("timeouts", 0)),
                      str(counts.get("errors", 0)), other)
    console.print(table)
    ex = Table(title=f"first {min(args.examples, len(rows))} examples")
    ex.add_column("#", justify="right")
    ex.add_column("completion (end)")
    for label in rs.labels:
        ex.add_column(label, justify="right")
    ex.add_column("total", justify="right")
    for i in range(min(args.examples, len(rows))):
        text = completion_text(completions[i]).replace("\n", " ")
        cells = ["None" if per[lb][i] is None else f"{per[lb][i]:.3g}" for lb in rs.labels]
        ex.add_row(str(i), escape(text[-70:]), *cells, f"{total[i]:.3g}")
    console.print(ex)
    return 0


def main(argv: list[str]) -> int:
    """Entry for `r1 rewards ...` (grpo/cli.py dispatches here)."""
    ap = argparse.ArgumentParser(prog="r1 rewards", description="List rewards, or score a JSONL file with them.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered rewards (built-in and entry points)")
    sc = sub.add_parser("score", help="score completions in a JSONL file")
    sc.add_argument("--reward", required=True, help="NAME[,NAME]: registry names, pkg.mod:fn or file.py:fn")
    sc.add_argument("--data", required=True, help="JSONL rows: completion, prompt, and columns such as answer")
    sc.add_argument("--kwargs", help='JSON {reward: {kwarg: value}}, e.g. \'{"format": {"variant": "soft"}}\'')
    sc.add_argument("--completion-field", default="completion")
    sc.add_argument("--prompt-field", default="prompt")
    sc.add_argument("--examples", type=int, default=5)
    args = ap.parse_args(argv)
    console = Console()
    return cmd_list(console) if args.cmd == "list" else cmd_score(args, console)


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
