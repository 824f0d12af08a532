"""Agreement of r1kit's `accuracy` reward with the labelled (gold, prediction, equal?) cases of math-verify's
own test suite, read at run time from a Math-Verify checkout (nothing of it is copied into r1kit).

Each parametrised test case is scored twice: by plain math-verify, with the parse/verify call its test makes
(extraction targets, float rounding, strict, set-relation flags), and by r1kit's `accuracy` reward with the
prediction as the completion `<answer>{pred}</answer>` and the gold as the `answer` column. A case agrees when
the score is 1 exactly where the label says equal. Prints both rates and every case r1kit scores differently.

    git clone https://github.com/huggingface/Math-Verify /tmp/Math-Verify   # or a bare git dir of it
    python bench/mathverify_agreement.py /tmp/Math-Verify [--deadline 10] [-v]

The deadline defaults to 10 s so that the verdicts, not the speed of a busy machine, are measured (a few
equation cases need about 0.5 s of sympy on a cold worker); timeouts are counted separately.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))  # bench/rewards.py must not shadow the rewards package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [os.path.dirname(_HERE)]

SKIP = {"test_string_extraction.py"}  # string-choice extraction only: no (gold, pred) pairs


def _test_sources(checkout: str) -> dict[str, str]:
    """{file name: source} of tests/*.py, from a work tree or from a bare git directory (its HEAD)."""
    tests = os.path.join(checkout, "tests")
    if os.path.isdir(tests):
        return {f: open(os.path.join(tests, f)).read() for f in sorted(os.listdir(tests)) if f.endswith(".py")}
    names = subprocess.run(["git", "--git-dir", checkout, "ls-tree", "--name-only", "HEAD", "tests/"],
                           check=True, capture_output=True, text=True).stdout.split()
    return {os.path.basename(n): subprocess.run(["git", "--git-dir", checkout, "show", f"HEAD:{n}"], check=True,
                                                capture_output=True, text=True).stdout
            for n in names if n.endswith(".py")}


def _value(node: ast.AST):
    """A literal, or a simple expression such as f"{math.sqrt(17):.15f}" evaluated with only `math` in scope."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return eval(compile(ast.Expression(node), "<case>", "eval"), {"__builtins__": {}, "math": math})


def _call_options(fn: ast.FunctionDef) -> dict | None:
    """How the test scores a pair: compare_strings(...) keywords ({name: literal or parameter name}), or
    {"plain": True} for verify(parse(gold), parse(pred)) with math-verify's defaults."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "compare_strings":
            return {k.arg: (k.value.id if isinstance(k.value, ast.Name) else ast.literal_eval(k.value))
                    for k in node.keywords}
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "verify":
            return {"plain": True}
    return None


def load_cases(checkout: str) -> list[dict]:
    """Every parametrised (gold, pred, expected) case with the options its test passes."""
    cases = []
    for fname, src in _test_sources(checkout).items():
        if fname in SKIP:
            continue
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, ast.FunctionDef):
                continue
            opts = _call_options(fn)
            for dec in fn.decorator_list:
                if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", None) == "parametrize") or not opts:
                    continue
                names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
                for row in dec.args[1].elts:
                    vals = dict(zip(names, (_value(e) for e in row.elts)))
                    kw = {k: vals[v] if isinstance(v, str) and v in vals else v for k, v in opts.items()}
                    want = vals.get("expected", vals.get("result"))
                    cases.append({"file": fname, "test": fn.name, "gold": vals["gold"], "pred": vals["pred"],
                                  "expected": int(want), "kw": kw})
    return cases


def mathverify_says(case: dict) -> bool:
    """Plain math-verify with the call the case's test makes."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    kw = case["kw"]
    if kw.get("plain"):
        return bool(verify(parse(case["gold"]), parse(case["pred"])))
    configs = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
               for t in kw.get("match_types", ["latex", "expr"])]
    return bool(verify(parse(case["gold"], configs), parse(case["pred"], configs),
                       float_rounding=kw.get("precision", 6), strict=kw.get("strict", True),
                       allow_set_relation_comp=kw.get("allow_set_relation_comp", False)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkout", help="Math-Verify work tree or bare git directory")
    ap.add_argument("--deadline", type=float, default=10.0, help="accuracy reward's per-item deadline (s)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print agreeing cases too")
    args = ap.parse_args()

    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure
    import rewards
    from rewards import _stats

    cases = load_cases(args.checkout)
    mv = [mathverify_says(c) for c in cases]
    t0 = time.monotonic()
    completions = [f"<answer>{c['pred']}</answer>" for c in cases]
    # a case whose test calls verify() with non-default options is scored with the same options (accuracy's
    # float_rounding, strict and allow_set_relation_comp kwargs pass them through)
    opts = [(c["kw"].get("precision", 6), c["kw"].get("strict", True), c["kw"].get("allow_set_relation_comp", False))
            for c in cases]
    got: list = [None] * len(cases)
    with _stats.collecting() as counts:
        for o in sorted(set(opts)):
            idx = [i for i, x in enumerate(opts) if x == o]
            scores = rewards.get("accuracy")([completions[i] for i in idx], None, answer=[cases[i]["gold"] for i in idx],
                                            deadline=args.deadline, float_rounding=o[0], strict=o[1],
                                            allow_set_relation_comp=o[2])
            for i, s in zip(idx, scores):
                got[i] = s
    dt = time.monotonic() - t0
    timeouts = counts["timeouts"]
    n = len(cases)
    agree = [(s == 1.0) == bool(c["expected"]) for s, c in zip(got, cases)]
    for c, s, m, ok in zip(cases, got, mv, agree):
        if not ok or args.verbose:
            print(f"{'ok  ' if ok else 'DIFF'} {c['file']}::{c['test']} label={c['expected']} mv={int(m)} "
                  f"r1kit={s} gold={c['gold'][:70]!r} pred={c['pred'][-70:]!r}")
    mv_ok = sum(int(m) == c["expected"] for m, c in zip(mv, cases))
    print(f"cases: {n} from {len({c['file'] for c in cases})} test files")
    print(f"math-verify alone agrees with the labels: {mv_ok}/{n} ({100 * mv_ok / n:.1f}%)")
    print(f"r1kit accuracy agrees with the labels:    {sum(agree)}/{n} ({100 * sum(agree) / n:.1f}%)"
          f"  [scored in {dt:.1f} s; None (gold_unparsed): {sum(s is None for s in got)}; timeouts: {timeouts}]")


if __name__ == "__main__":
    main()
