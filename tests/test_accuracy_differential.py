"""Differential test of the `accuracy` reward against plain math-verify on generated answers.

A seeded generator writes equal (gold, answer) pairs in many notations (thousands separators, decimal commas,
fractions with and without braces, mixed numbers, radicals, pi, percentages, intervals, sets, tuples,
matrices, currency and units, answer sentences, $$…$$, \\boxed, several boxes and "and" lists) and unequal
pairs in the same notations. On equal pairs r1kit must score 1 exactly where math-verify alone says equal
(math-verify's verdict is computed here with the parse/verify calls of its own tests, on the text as they
hand it over: LaTeX inside $…$, numbers and sentences as they are); on unequal pairs r1kit must score 0.
Only notations that math-verify itself accepts are generated: r1kit's own additions (\\$12, 1\\,000, cut-short
readings, ...) are in tests/test_rewards_cases.py. Both sides run at once, in the reward's worker pool and in
two more processes, and parse each distinct text once: about 15 s on a quiet 2-core machine.
"""

from __future__ import annotations

import functools
import multiprocessing
import random
import re
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from math import gcd

import pytest

import rewards

N_EQUAL = 2000
N_UNEQUAL = 400
SEED = 12


def _frac(f: Fraction, style: str) -> str:
    """A fraction in one of the written forms math-verify reads."""
    a, b = abs(f.numerator), f.denominator
    sign = "-" if f < 0 else ""
    if b == 1:
        return f"{sign}{a}"
    if style == "slash":
        return f"{sign}{a}/{b}"
    if style == "braceless" and a < 10 and b < 10:
        return f"{sign}\\frac{a}{b}"
    if style == "spaced" and a < 10 and b < 10:
        return f"{sign}\\dfrac {a}{b}"
    cmd = {"tfrac": "tfrac", "dfrac": "dfrac"}.get(style, "frac")
    return f"{sign}\\{cmd}{{{a}}}{{{b}}}"


def _thousands(n: int, sep: str) -> str:
    s = f"{n:,}"
    return s.replace(",", sep)


SENTENCES = ["The answer is {}.", "So the final result is {}.", "Therefore, the value we want is {}.",
             "Final Answer: The final answer is {}. I hope it is correct.", "Thus we obtain {}.",
             "Hence the required quantity equals {}.", "After simplifying, we get {}"]


def _sentences(rng: random.Random, x: str, k: int = 3) -> list[str]:
    """Answer sentences with varied lead-ins; the math in $…$ (always, when it is LaTeX) or bare."""
    return [t.format(f"${x}$" if "\\" in x or rng.random() < 0.5 else x) for t in rng.sample(SENTENCES, k)]


KINDS = ["int", "thousands", "decimal", "comma_decimal", "fraction", "mixed", "radical", "pi", "percent",
         "interval", "union", "set", "tuple", "matrix", "units", "sentence", "display", "boxed", "boxes",
         "and_list", "equation", "power"]


def equal_value(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """(kind, [(gold, answer), ...]): one random value, written in every notation of its kind."""
    kind = rng.choice(KINDS)
    n = rng.randint(2, 99)
    if kind == "int":
        return kind, [(str(n), p) for p in (f"{n}.0", f"x = {n}", f"${n}$", f"{n}.", f"\\text{{{n}}}", f"0{n}")]
    if kind == "thousands":
        m = rng.randint(1000, 10**9)
        c = _thousands(m, ",")
        return kind, [(g, p) for g in (str(m), c) for p in (c, _thousands(m, " "), _thousands(m, "{,}"), str(m),
                                                             f"{m}.0", c + ".0") if g != p]
    if kind == "decimal":
        f = Fraction(rng.randint(1, 99), rng.choice([2, 4, 5, 8, 10, 20, 25]))
        d = f"{float(f):g}"
        out = [(d, _frac(f, st)) for st in ("frac", "slash", "dfrac")] + [(_frac(f, "frac"), d)]
        out += [(d, d + "0")] if "." in d else []
        out += [(d, d[1:])] if d.startswith("0.") else []
        return kind, [(g, p) for g, p in out if g != p]
    if kind == "comma_decimal":  # math-verify reads 1,5 as 1.5 (never a three-digit group: 1,500 is a thousand)
        i = rng.randint(0, 99)
        return kind, [x for dec in (str(rng.randint(1, 9)), str(rng.randint(11, 99)).replace("0", "5"))
                      for x in ((f"{i}.{dec}", f"{i},{dec}"), (f"{i},{dec}", f"{i}.{dec}"))]
    if kind == "fraction":
        f = Fraction(rng.randint(1, 30), rng.randint(2, 30)) * rng.choice([1, -1])
        if f.denominator == 1:
            f += Fraction(1, 7)
        k = rng.randint(2, 4)
        unreduced = f"{'-' if f < 0 else ''}\\frac{{{abs(f.numerator) * k}}}{{{f.denominator * k}}}"
        preds = {_frac(f, st) for st in ("slash", "tfrac", "dfrac", "braceless", "spaced")} | {unreduced}
        return kind, [(_frac(f, "frac"), p) for p in sorted(preds) if p != _frac(f, "frac")]
    if kind == "mixed":
        w, b = rng.randint(1, 9), rng.choice([2, 4, 5])
        a = rng.choice([x for x in range(1, b) if gcd(x, b) == 1])
        f = w + Fraction(a, b)
        return kind, [(g, f"{w}\\frac{{{a}}}{{{b}}}") for g in (_frac(f, "frac"), f"{float(f):g}")]
    if kind == "radical":
        sq, c = rng.choice([2, 3, 5, 6, 7, 10, 11]), rng.randint(1, 9)
        head = f"{c}" if c > 1 else ""
        preds = [f"\\sqrt{{{c * c * sq}}}", f"{head} \\sqrt{{{sq}}}"]
        if sq < 10:  # brace-less \sqrt3 takes one character, as in TeX
            preds += [f"{head}\\sqrt {sq}", f"{head}\\sqrt{sq}"]
        return kind, [(f"{head}\\sqrt{{{sq}}}", p) for p in preds if p != f"{head}\\sqrt{{{sq}}}"]
    if kind == "pi":
        f = Fraction(rng.randint(1, 9), rng.randint(2, 9))
        p, q = f.numerator, f.denominator
        if q == 1:
            return kind, [(f"{p}\\pi", x) for x in (f"{p} \\pi", f"\\frac{{{2 * p}\\pi}}{{2}}", f"\\pi {p}")]
        return kind, [(f"\\frac{{{p}\\pi}}{{{q}}}", x) for x in
                      (f"\\frac{{{p}}}{{{q}}}\\pi", f"{p}\\pi/{q}", f"\\frac{{{p} \\pi}}{{{q}}}")]
    if kind == "percent":
        p = rng.randint(1, 99)
        return kind, [(f"{p}\\%", f"{p / 100:g}"), (f"{p / 100:g}", f"{p}\\%"), (f"{p}", f"{p}%"),
                      (f"{p}\\%", f"{p} \\%")]
    if kind in ("interval", "union"):
        a = rng.randint(-9, 9)
        b = a + rng.randint(1, 9)
        left, right = rng.choice("(["), rng.choice(")]")
        gold, preds = f"{left}{a},{b}{right}", [f"{left}{a}, {b}{right}", f"\\left{left}{a}, {b}\\right{right}"]
        if rng.random() < 0.3:
            gold, preds = f"(-\\infty, {a})", [f"(-\\infty,{a})", f"\\left(-\\infty, {a}\\right)"]
        if kind == "union":
            c = b + rng.randint(1, 3)
            d = c + rng.randint(1, 3)
            gold, preds = f"{gold} \\cup [{c},{d}]", [f"{p}\\cup[{c}, {d}]" for p in preds]
        return kind, [(gold, p) for p in preds]
    if kind == "set":
        xs = rng.sample(range(-5, 12), rng.randint(2, 3))
        ys = ", ".join(map(str, rng.sample(xs, len(xs))))
        return kind, [("\\{" + ",".join(map(str, xs)) + "\\}", p) for p in
                      ("\\{" + ys + "\\}", ys, "\\left\\{" + ys + "\\right\\}")]
    if kind == "tuple":
        xs = [rng.randint(-5, 20) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.3:
            xs[0] = Fraction(rng.randint(1, 9), rng.randint(2, 9))
        g = "(" + ",".join(_frac(x, "frac") if isinstance(x, Fraction) else str(x) for x in xs) + ")"
        p = "(" + ", ".join(_frac(x, "dfrac") if isinstance(x, Fraction) else str(x) for x in xs) + ")"
        return kind, [(g, p), (g, "\\left" + p[:-1] + "\\right)")]
    if kind == "matrix":
        r, c = rng.choice([(2, 2), (2, 1), (1, 3), (3, 3), (2, 3)])
        vals = [[rng.randint(-3, 3) for _ in range(c)] for _ in range(r)]
        tight = "\\\\".join("&".join(map(str, row)) for row in vals)
        loose = " \\\\ ".join(" & ".join(map(str, row)) for row in vals)
        m = lambda env, body: f"\\begin{{{env}}}{body}\\end{{{env}}}"  # noqa: E731
        return kind, [(m("pmatrix", tight), m("bmatrix", loose)), (m("bmatrix", loose), m("pmatrix", tight)),
                      (m("pmatrix", loose), m("bmatrix", tight))]
    if kind == "units":
        v = rng.choice([str(n), f"{n}.5", _thousands(rng.randint(1000, 99999), ",")])
        plain = [f"{v} dollars", f"{v}€", f"{v}$", f"{v} m²"]
        latex = [f"{v} \\text{{ cm}}", f"{v}\\,\\mathrm{{km}}", f"{v} \\text{{ meters}}", f"{v}\\text{{ kg}}"]
        # math-verify reads 1,234 inside LaTeX as a pair: r1kit's reading of 1,234\,\mathrm{km} is its own rule
        return kind, [(v.replace(",", ""), p) for p in plain + (latex if "," not in v else [])]
    if kind == "sentence":
        v = rng.choice([str(n), f"\\frac{{1}}{{{n}}}", f"{n}\\sqrt{{2}}", f"{n}.25"])
        return kind, [(v, p) for p in _sentences(rng, v, 4)]
    if kind == "display":
        v = rng.choice([str(n), f"\\frac{{{n}}}{{{n + 1}}}", f"({n}, {n + 2})"])
        return kind, [(f"$${v}$$", v), (v, f"$${v}$$"), (f"${v}$", f"\\[{v}\\]"), (v, f"\\({v}\\)")]
    if kind == "boxed":
        v = rng.choice([str(n), f"\\frac{{{n}}}{{{n + 1}}}", f"{n}\\pi"])
        return kind, [(v, p) for p in (f"\\boxed{{{v}}}", f"so the answer is $\\boxed{{{v}}}$.",
                                       f"We find \\[\\boxed{{{v}}}\\]", f"\\boxed{{{v}}}. This is {v}.")]
    if kind == "boxes":  # several boxed answers for a list gold
        xs = rng.sample(range(-5, 15), rng.randint(2, 3))
        golds = ["\\{" + ", ".join(map(str, xs)) + "\\}", ", ".join(map(str, xs))]
        return kind, [(g, sep.join(f"\\boxed{{{x}}}" for x in xs)) for g in golds
                      for sep in (" and ", ", ", " \\quad \\text{and} \\quad ")]
    if kind == "and_list":
        xs = rng.sample(range(-5, 15), rng.randint(2, 3))
        listed = ", ".join(map(str, xs))
        anded = [" and ".join(f"${x}$" for x in xs), " and ".join(map(str, xs)),
                 "\\boxed{" + " \\text{ and } ".join(map(str, xs)) + "}"]
        return kind, [x for a in anded for x in (("\\{" + listed + "\\}", a), (a, "\\{" + listed + "\\}"), (a, listed))]
    if kind == "equation":
        return kind, [(str(n), f"x = {n}"), (f"x = {n}", str(n)), (f"y = {n}x + 1", f"{n}x+1"),
                      (f"x={n}", f"x = \\frac{{{2 * n}}}{{2}}")]
    a, e = rng.randint(2, 9), rng.randint(2, 4)  # power
    return kind, [(str(a ** e), f"{a}^{{{e}}}"), (f"{a}^{e}", str(a ** e)), (f"\\sqrt[{e}]{{{a ** e}}}", str(a))]


def unequal(rng: random.Random, kind: str, gold: str, pred: str) -> str:
    """The answer changed to a different value, in the same notation."""
    swaps = {"(": "[", "[": "(", ")": "]", "]": ")"}
    if kind in ("interval", "union") and rng.random() < 0.5:  # flip the last bracket (never one at infinity)
        i = max(i for i, ch in enumerate(pred) if ch in ")]")
        return pred[:i] + swaps[pred[i]] + pred[i + 1:]
    if kind == "tuple" and rng.random() < 0.5:  # swap two coordinates
        parts = pred.replace("\\left", "").replace("\\right", "").strip("()").split(", ")
        if parts[0] != parts[1]:
            return "(" + ", ".join([parts[1], parts[0]] + parts[2:]) + ")"
    # otherwise add 1-3 to the answer's first number
    m = re.search(r"\d+", pred)
    if m is None:
        return pred + "+1"
    return pred[:m.start()] + str(int(m.group()) + rng.choice([1, 2, 3])) + pred[m.end():]


# a single number in a plain format (1 000, 1,5, 12 dollars, 3 m², 7€): math-verify reads these from raw text
_PLAIN_NUMBER = re.compile(r"[-+]?\d[\d,. ]*(?<![, ])\s*(?:€|\$|[A-Za-z²³]+)?\.?")


def _mathverify_view(x: str) -> str:
    """What math-verify's own tests hand it: sentences, text with $…$ and plain numbers as they are, any other
    bare LaTeX inside $…$ (math-verify reads raw text only for its last number)."""
    commands = r"\\(?:begin|end|text|mathrm)\{[^{}]*\}|\\[A-Za-z]+"
    words = [w for w in re.findall(r"[A-Za-z]{3,}", re.sub(commands, " ", x)) if w not in ("and", "or")]
    if "$" in x or "\\(" in x or "\\[" in x or len(words) >= 2:
        return x
    return x if _PLAIN_NUMBER.fullmatch(x) and ", " not in x else f"${x}$"


def _init_mathverify() -> None:
    """Parse with the workers' ANTLR setting (SLL first, full LL on a syntax error: the same trees, see
    test_two_stage_antlr_parse_matches_ll), which is about 20 times faster on tuples and intervals."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "rewards" / "_mathworker.py"
    spec = importlib.util.spec_from_file_location("_r1kit_mathworker", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@functools.lru_cache(maxsize=None)
def _mathverify_parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()], parsing_timeout=None)


def _mathverify_equal(pair: tuple[str, str]) -> bool:
    """Plain math-verify's verdict, with the parse/verify calls of its own tests (each text parsed once)."""
    from math_verify import verify

    gold, pred = map(_mathverify_view, pair)
    return verify(_mathverify_parse(gold), _mathverify_parse(pred), timeout_seconds=None)


def _pairs(n: int, seed: int, equal: bool = True) -> list[tuple[str, str, str]]:
    """n distinct (kind, gold, answer) rows: every notation of one value after another."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        kind, rows = equal_value(rng)
        for gold, pred in rows:
            if not equal:
                pred = unequal(rng, kind, gold, pred)
            if (gold, pred) not in seen and len(out) < n:
                seen.add((gold, pred))
                out.append((kind, gold, pred))
    return out


@pytest.fixture(scope="module")
def scored():
    """Both pair sets scored by r1kit (one batch through the reward's worker pool) and, at the same time, by
    math-verify in two more processes."""
    eq, ne = _pairs(N_EQUAL, SEED), _pairs(N_UNEQUAL, SEED + 1, equal=False)
    rows = eq + ne
    ctx = multiprocessing.get_context("spawn")  # the trainer process has threads: never fork it
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init_mathverify) as ex:
        pending = ex.map(_mathverify_equal, [(g, p) for _, g, p in rows], chunksize=50)
        r1 = rewards.get("accuracy")([f"<answer>{p}</answer>" for _, _, p in rows], None,
                                     answer=[g for _, g, _ in rows], deadline=10.0)
        mv = list(pending)
    return eq, ne, mv[:len(eq)], mv[len(eq):], r1[:len(eq)], r1[len(eq):]


def test_generator_covers_every_notation():
    kinds = {k for k, _, _ in _pairs(N_EQUAL, SEED)}
    assert kinds == set(KINDS), set(KINDS) - kinds
    assert N_EQUAL >= 2000


def test_equal_pairs_agree_with_mathverify(scored):
    eq, _, mv, _, r1, _ = scored
    bad = [(k, g, p, m, s) for (k, g, p), m, s in zip(eq, mv, r1) if (s == 1.0) != m]
    rate = 1 - len(bad) / len(eq)
    print(f"\nequal pairs: r1kit agrees with math-verify on {len(eq) - len(bad)}/{len(eq)} ({100 * rate:.2f}%); "
          f"math-verify says equal on {sum(mv)}/{len(eq)}")
    assert not bad, f"agreement {100 * rate:.2f}% on {len(eq)} equal pairs; differences (kind, gold, answer, " \
                    f"math-verify, r1kit):\n" + "\n".join(map(repr, bad[:40]))


def test_equal_pairs_are_all_equal_for_mathverify(scored):
    """The generator writes only notations math-verify accepts, so agreeing means scoring 1 on every one."""
    eq, _, mv, _, _, _ = scored
    missed = [row for row, m in zip(eq, mv) if not m]
    assert not missed, f"math-verify says equal on {100 * (1 - len(missed) / len(eq)):.2f}% of the equal pairs; " \
        f"{len(missed)} it calls unequal:\n" + "\n".join(map(repr, missed[:20]))


def test_unequal_pairs_score_zero(scored):
    _, ne, _, mv, _, r1 = scored
    fp = [(k, g, p, s) for (k, g, p), s in zip(ne, r1) if s != 0.0]
    print(f"\nunequal pairs: {len(ne) - len(fp)}/{len(ne)} score 0; math-verify says equal on {sum(mv)}")
    assert not fp, f"{100 * (1 - len(fp) / len(ne)):.2f}% of {len(ne)} unequal pairs score 0; false positives:\n" + \
        "\n".join(map(repr, fp[:40]))
