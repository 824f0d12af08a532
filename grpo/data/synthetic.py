"""Built-in synthetic task: multi-step integer arithmetic whose solution is a chain of written steps.

"Compute (3 + 4) * 5 - 2" -> "3 + 4 = 7. 7 * 5 = 35. 35 - 2 = 33." Operations apply left to right, so each
step uses the previous result; writing the steps out is what makes the problem solvable for a small model.
Train and held-out splits are disjoint by construction: a problem's split is a hash of its text.
"""

from __future__ import annotations

import hashlib
import random

def _split_of(expr: str) -> str:
    """Deterministic split: about 1 in 8 distinct problems is held out."""
    return "test" if hashlib.sha1(expr.encode()).digest()[0] % 8 == 0 else "train"


def _problem(rng: random.Random, n_ops: int) -> tuple[str, list[str], int]:
    """One problem: (expression text, worked steps, answer). Values stay small and non-negative."""
    value = rng.randint(1, 9)
    expr, steps = str(value), []
    for _ in range(n_ops):
        op = rng.choice(("+*" if value <= 10 else "+") + ("-" if value >= 2 else ""))
        b = rng.randint(1, min(9, value - 1)) if op == "-" else rng.randint(2 if op == "*" else 1, 9)
        new = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append(f"{value} {op} {b} = {new}.")
        # parenthesise the running expression when a * follows a + or -
        if op == "*" and (" + " in expr or " - " in expr):
            expr = f"({expr})"
        expr = f"{expr} {op} {b}"
        value = new
    return expr, steps, value


def arithmetic_rows(split: str = "train", n: int = 1000, seed: int = 0, min_ops: int = 2, max_ops: int = 3,
                    tagged_fraction: float = 1.0) -> list[dict]:
    """`n` distinct problems of `split` with columns prompt, answer, solution (the worked solution, written in
    R1 tags for `tagged_fraction` of rows and as plain text ending "The answer is N." otherwise)."""
    if split not in ("train", "test"):
        raise ValueError(f"synthetic:arith has splits 'train' and 'test', not {split!r}")
    rng = random.Random(f"arith-{seed}-{split}")
    style_rng = random.Random(f"arith-style-{seed}-{split}")
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"synthetic:arith cannot make {n} distinct {split} problems with {min_ops}-{max_ops} ops")
        expr, steps, ans = _problem(rng, rng.randint(min_ops, max_ops))
        if expr in seen or _split_of(expr) != split:
            continue
        seen.add(expr)
        work = " ".join(steps)
        if style_rng.random() < tagged_fraction:
            solution = f"<think> {work} </think> <answer> {ans} </answer>"
        else:
            solution = f"{work} The answer is {ans}."
        rows.append({"prompt": f"Compute {expr}", "answer": str(ans), "solution": solution})
    return rows
