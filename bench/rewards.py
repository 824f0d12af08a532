"""Benchmark: r1kit's `accuracy` against TRL's `trl.rewards.accuracy_reward` on the same 5,000 math completions.

Completions are generated deterministically (seed 0) as GRPO would see them: 625 problems x 8 samples, a chain
of thought of 40-300 words with some inline math, then an answer right in one of several written forms, wrong,
hedged, or only inside the thought; boxed (80%) or in <answer> tags (20%). Both rewards score the same items
in batches of 64, alternating batch by batch in one run, in this process's main thread (TRL's timeouts are on
there). Prints completions/s for each, the share of items where they disagree with examples, and the speed
ratio last.

    python bench/rewards.py [--n 5000] [--batch 64] [--workers N] [--deadline 1.0]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections import Counter
from fractions import Fraction

# this file is called rewards.py: keep its folder from shadowing the `rewards` package
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [os.path.dirname(_HERE)]



def _problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, right answers in several written forms, wrong answers) for one random problem."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    kind = rng.choice(["int", "int", "frac", "decimal", "sqrt", "pi", "percent", "thousands", "interval", "set",
                       "tuple", "equation", "units"])
    if kind == "int":
        return str(a * b), [str(a * b), f"{a * b}.0", f"x = {a * b}"], [str(a * b + 1), f"{a} \\times {b}1"]
    if kind == "frac":
        f = Fraction(a, b)
        return f"\\frac{{{f.numerator}}}{{{f.denominator}}}", [
            f"\\frac{{{f.numerator}}}{{{f.denominator}}}", f"{f.numerator}/{f.denominator}",
            f"\\dfrac{{{2 * f.numerator}}}{{{2 * f.denominator}}}"], [f"\\frac{{{f.denominator}}}{{{f.numerator}}}"]
    if kind == "decimal":
        return f"{a / 4}", [f"{a / 4}", f"\\frac{{{a}}}{{4}}"], [f"{a / 4 + 0.5}"]
    if kind == "sqrt":
        return f"{a}\\sqrt{{2}}", [f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a}}}"], [f"{a}\\sqrt{{3}}"]
    if kind == "pi":
        return f"\\frac{{{a}\\pi}}{{3}}", [f"\\frac{{{a}\\pi}}{{3}}", f"{a}\\pi/3"], [f"\\frac{{{a}\\pi}}{{6}}"]
    if kind == "percent":
        return f"{a}\\%", [f"{a}\\%", f"{a / 100}"], [f"{a + 1}\\%"]
    if kind == "thousands":
        n = a * 1000 + b
        return str(n), [str(n), f"{a},{b:03d}", f"{a}{{,}}{b:03d}"], [str(n + 1000)]
    if kind == "interval":
        lo, hi = min(a, b), max(a, b) + 1
        return f"({lo}, {hi}]", [f"({lo},{hi}]", f"\\left({lo}, {hi}\\right]"], [f"[{lo}, {hi}]"]
    if kind == "set":
        return f"\\{{{a}, {b + 100}\\}}", [f"\\{{{b + 100}, {a}\\}}", f"{a}, {b + 100}"], [f"\\{{{a}\\}}"]
    if kind == "tuple":
        return f"({a}, {b})", [f"({a},{b})"], [f"({b + 100}, {a})"]
    if kind == "equation":
        return f"{a}", [f"x = {a}", f"{a}"], [f"x = {a + 2}"]
    return str(a), [f"{a} \\text{{ cm}}", f"\\${a}", f"{a}"], [f"{a + 3} \\text{{ cm}}"]


def _completion(rng: random.Random, gold_forms: list[str], wrong: list[str]) -> str:
    r = rng.random()
    if r < 0.55:
        ans = rng.choice(gold_forms)
    elif r < 0.85:
        ans = rng.choice(wrong)
    elif r < 0.93:  # hedge: right and wrong together, in either order
        pair = [rng.choice(wrong), gold_forms[0]]
        rng.shuffle(pair)
        ans = f"{pair[0]} \\text{{ or }} {pair[1]}"
    else:  # right answer only inside the reasoning
        return f"<think>I get \\boxed{{{gold_forms[0]}}} maybe.</think> I am not sure."
    words = ["Let", "us", "compute", "carefully", "then", "simplify", "the", "sum", "so", "we", "check", "again"]
    steps = [rng.choice(words) if rng.random() < 0.85 else f"${rng.randint(1, 99)} + {rng.randint(1, 99)}$"
             for _ in range(rng.randint(40, 300))]  # R1-style chains of thought: prose with inline math
    think = "<think>" + " ".join(steps) + "</think>"
    if rng.random() < 0.8:
        return f"{think} The final answer is $\\boxed{{{ans}}}$."
    return f"{think} <answer>{ans}</answer>"


def make_data(n: int, group: int = 8, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    comps, golds = [], []
    while len(comps) < n:
        gold, forms, wrong = _problem(rng)
        for _ in range(group):
            comps.append(_completion(rng, forms, wrong))
            golds.append(gold)
    return comps[:n], golds[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="r1kit verification workers (default: core count)")
    ap.add_argument("--deadline", type=float, default=1.0, help="r1kit per-item deadline, seconds (default 1)")
    args = ap.parse_args()
    if args.workers:
        os.environ["R1KIT_VERIFY_WORKERS"] = str(args.workers)
    logging.disable(logging.WARNING)
    from trl.rewards import accuracy_reward as trl_accuracy

    import rewards
    from rewards._pool import get_pool

    comps, golds = make_data(args.n)
    chats = [[{"role": "assistant", "content": c}] for c in comps]
    trl_golds = [f"${g}$" for g in golds]  # TRL's gold parser needs math delimiters around LaTeX; r1kit's does not
    print(f"{len(comps)} completions, {len(set(golds))} distinct golds, "
          f"{len(set(zip(comps, golds)))} distinct (completion, gold) pairs; batch {args.batch}; "
          f"{os.cpu_count()} cores")

    t0 = time.perf_counter()
    pool = get_pool()
    print(f"r1kit verification pool: {pool.size} workers, started in {time.perf_counter() - t0:.2f} s "
          "(not timed below)")
    ours = rewards.get("accuracy")
    r1, tr, t_r1, t_trl = [], [], 0.0, 0.0
    for i in range(0, len(comps), args.batch):  # alternate batches so both see the same machine load
        t0 = time.perf_counter()
        r1 += ours(comps[i:i + args.batch], None, answer=golds[i:i + args.batch], deadline=args.deadline)
        t1 = time.perf_counter()
        tr += trl_accuracy(chats[i:i + args.batch], trl_golds[i:i + args.batch])
        t_r1, t_trl = t_r1 + t1 - t0, t_trl + time.perf_counter() - t1

    print(f"r1kit accuracy:            {len(comps) / t_r1:8.1f} completions/s ({t_r1:.2f} s)")
    print(f"trl.rewards.accuracy_reward: {len(comps) / t_trl:6.1f} completions/s ({t_trl:.2f} s)")
    from rewards._stats import GLOBAL

    print(f"r1kit counters: {dict(GLOBAL)}")
    diff = [i for i in range(len(comps)) if r1[i] != tr[i]]
    print(f"disagree on {len(diff)} / {len(comps)} = {100 * len(diff) / len(comps):.1f}% of items "
          f"(r1kit, trl): {dict(Counter((r1[i], tr[i]) for i in diff))}")
    from rewards._text import extract_answer

    # which of r1kit's disagreeing verdicts were deadline hits (a loaded machine), not a different judgement
    again = ours([comps[i] for i in diff], None, answer=[golds[i] for i in diff], deadline=30.0)
    late = {i for i, a in zip(diff, again) if a != r1[i]}
    if late:
        print(f"  of these, {len(late)} are r1kit deadline hits ({args.deadline} s); with a 30 s deadline "
              f"r1kit agrees with trl on {sum(again[k] == tr[i] for k, i in enumerate(diff) if i in late)} of them")

    def why(i: int) -> str:
        if i in late:
            return f"r1kit hit its {args.deadline} s deadline"
        if comps[i].startswith("<think>I get"):
            return "answer only inside <think>"
        if "\\text{ or }" in comps[i]:
            return "hedge (right and wrong answers)"
        if "<answer>" in comps[i]:
            return "<answer> tag, no \\boxed"
        return "same boxed answer, different verdict"

    print("  by cause:", dict(Counter((why(i), f"r1kit={r1[i]} trl={tr[i]}") for i in diff).most_common()))
    shown: Counter = Counter()
    for i in diff:
        key = (r1[i], tr[i], why(i))
        if shown[key] >= 2:
            continue
        shown[key] += 1
        print(f"  [{why(i)}] r1kit={r1[i]} trl={tr[i]} gold={golds[i]!r} answer={extract_answer(comps[i])[0]!r} "
              f"| ...{comps[i][-60:]!r}")
    print(f"ratio r1kit/trl completions/s: {t_trl / t_r1:.2f}")


if __name__ == "__main__":
    main()
