"""Built-in synthetic task: multi-step integer arithmetic whose solution is a chain of written steps.

"Compute (3 + 4) * 5 - 2" -> "3 + 4 = 7. 7 * 5 = 35. 35 - 2 = 33." Operations apply left to right, so each
step uses the previous result; writing the steps out is what makes the problem solvable for a small model.
Train and held-out splits are disjoint by construction: a problem's split is a hash of its text.

`synthetic:arith_lang` poses the same kind of problems in English, German or French and narrates each step in
words ("First, we take 3 plus 4, which gives us 7."), so the `language` reward has words to score; a share of
solutions mixes languages within one chain of thought. Simplifications: one fixed phrasing per language (a tiny
model with a 1k BPE vocabulary learns it), numbers stay digits, and a problem's split ignores its language.
"""

from __future__ import annotations

import hashlib
import random

def _split_of(expr: str) -> str:
    """Deterministic split: about 1 in 8 distinct problems is held out."""
    return "test" if hashlib.sha1(expr.encode()).digest()[0] % 8 == 0 else "train"


def _chain(rng: random.Random, n_ops: int) -> tuple[str, list[tuple[int, str, int, int]], int]:
    """One problem: (expression text, steps as (a, op, b, result), answer). Values stay small and non-negative."""
    value = rng.randint(1, 9)
    expr, steps = str(value), []
    for _ in range(n_ops):
        op = rng.choice(("+*" if value <= 10 else "+") + ("-" if value >= 2 else ""))
        b = rng.randint(1, min(9, value - 1)) if op == "-" else rng.randint(2 if op == "*" else 1, 9)
        new = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append((value, op, b, new))
        # parenthesise the running expression when a * follows a + or -
        if op == "*" and (" + " in expr or " - " in expr):
            expr = f"({expr})"
        expr = f"{expr} {op} {b}"
        value = new
    return expr, steps, value


def _problem(rng: random.Random, n_ops: int) -> tuple[str, list[str], int]:
    """One problem: (expression text, worked steps in symbols, answer)."""
    expr, steps, value = _chain(rng, n_ops)
    return expr, [f"{a} {op} {b} = {c}." for a, op, b, c in steps], value


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


# ---- synthetic:arith_lang: the same problems, each step narrated in words of one language ----
# Every sentence (a step, or the closing one) has 6-8 words (numbers and symbols do not count), so that the
# `language` reward, which asks lingua about sentences of 6+ words, judges each on its own: its score is the
# share of words in target-language sentences. The phrasings were chosen because lingua (low-accuracy mode, all
# Latin-script languages) names each of them correctly; it reads "Then, we compute 3 plus 4, ..." as German.
NARRATION = {  # per language: prompt, first / later step openers, step, closing sentence, operator words
    "en": {"prompt": "Compute {expr} and answer in English", "first": "First,", "then": "Then,",
           "step": "{w} we take {a} {op} {b}, which gives us {c}.",
           "final": "So we see that the answer is {ans}.",
           "ops": {"+": "plus", "-": "minus", "*": "times"}},
    "de": {"prompt": "Berechne {expr} und antworte auf Deutsch", "first": "Zuerst", "then": "Dann",
           "step": "{w} rechnen wir {a} {op} {b}, und das Ergebnis ist {c}.",
           "final": "Also ist die Antwort auf die Aufgabe {ans}.",
           "ops": {"+": "plus", "-": "minus", "*": "mal"}},
    "fr": {"prompt": "Calcule {expr} et réponds en français", "first": "D'abord,", "then": "Ensuite,",
           "step": "{w} nous calculons {a} {op} {b}, et le résultat est {c}.",
           "final": "Donc la réponse finale est bien {ans}.",
           "ops": {"+": "plus", "-": "moins", "*": "fois"}},
}


def _sentence_langs(rng: random.Random, target: str, languages: list[str], n_steps: int, mixed: bool) -> list[str]:
    """Language of each step, then of the closing sentence. Mixed: each sentence is the target or, with
    probability 1/2, another language; redrawn until the steps hold both the target and another language."""
    if not mixed:
        return [target] * (n_steps + 1)
    others = [lang for lang in languages if lang != target]
    while True:
        langs = [target if rng.random() < 0.5 else rng.choice(others) for _ in range(n_steps + 1)]
        if target in langs[:n_steps] and set(langs[:n_steps]) - {target}:
            return langs


def arithmetic_lang_rows(split: str = "train", n: int = 1000, seed: int = 0, min_ops: int = 2, max_ops: int = 3,
                         tagged_fraction: float = 1.0, languages: tuple[str, ...] = ("en", "de"),
                         mixed_fraction: float = 0.0) -> list[dict]:
    """`n` distinct problems of `split`, each asked and solved in a target language drawn uniformly from
    `languages` (column `lang`, what the `language` reward reads). `mixed_fraction` of solutions narrate their
    steps in several languages (column `cot_langs`: each sentence's language). Splits as synthetic:arith."""
    if split not in ("train", "test"):
        raise ValueError(f"synthetic:arith_lang has splits 'train' and 'test', not {split!r}")
    unknown = [lang for lang in languages if lang not in NARRATION]
    if unknown or not languages:
        raise ValueError(f"synthetic:arith_lang: languages {list(languages)}: choose from {', '.join(NARRATION)}")
    if mixed_fraction > 0 and (len(set(languages)) < 2 or min_ops < 2):
        raise ValueError("synthetic:arith_lang: mixed_fraction > 0 needs two languages and min_ops >= 2")
    languages = list(dict.fromkeys(languages))
    rng = random.Random(f"arith_lang-{seed}-{split}")
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"synthetic:arith_lang cannot make {n} distinct {split} problems "
                             f"with {min_ops}-{max_ops} ops")
        expr, steps, ans = _chain(rng, rng.randint(min_ops, max_ops))
        if expr in seen or _split_of(expr) != split:
            continue
        seen.add(expr)
        # the style of row i depends on (seed, split, i) alone: changing a fraction changes no other row
        style = random.Random(f"arith_lang-style-{seed}-{split}-{len(rows)}")
        tagged = style.random() < tagged_fraction
        target = style.choice(languages)
        mixed = style.random() < mixed_fraction
        langs = _sentence_langs(style, target, languages, len(steps), mixed)
        said = [NARRATION[lang]["step"].format(w=NARRATION[lang]["first" if i == 0 else "then"], a=a,
                                               op=NARRATION[lang]["ops"][op], b=b, c=c)
                for i, (lang, (a, op, b, c)) in enumerate(zip(langs, steps))]
        work = " ".join(said)
        if tagged:
            solution, langs = f"<think> {work} </think> <answer> {ans} </answer>", langs[:-1]
        else:
            solution = f"{work} {NARRATION[langs[-1]]['final'].format(ans=ans)}"
        rows.append({"prompt": NARRATION[target]["prompt"].format(expr=expr), "answer": str(ans),
                     "solution": solution, "lang": target, "cot_langs": " ".join(langs)})
    return rows
