"""`accuracy`: is the final answer right? R1's rule-based correctness reward, built on math-verify and sympy.

Modes (per recipe with `mode=`, or per item from the column named by `mode_column`, default `answer_mode`):
  math     math-verify equivalence: LaTeX, fractions/decimals, radicals, pi, intervals, sets, tuples, matrices,
           percentages, thousands separators, units and currency, `x = 2` forms
  numeric  |pred - gold| within rel_tol / abs_tol after evaluating both (e.g. 3.1416 for \\pi)
  choice   multiple-choice letter: "(B)", "B.", "Option B", "\\text{B}"; naming two letters is a hedge
  exact    normalised exact string (case, whitespace, \\text{}, outer $ and end punctuation ignored)
Scores: 1.0 right, 0.0 wrong/missing/hedged/timed out, None when the gold answer cannot be read (counted as
`gold_unparsed`, never a silent 0). math and numeric run in the killable worker pool (rewards._pool) with a
per-item deadline; the trainer process never parses with sympy. choice and exact are plain string work.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from threading import Lock

from rewards import _stats
from rewards._pool import get_pool
from rewards._text import completion_text, gold_is_single, is_hedge, normalise_string, strip_thousands
from rewards._text import extract_answer as _extract
from rewards.registry import register

MODES = ("math", "numeric", "choice", "exact")
# (mode, gold, pred, tolerances) -> (score, why): groups repeat answers. A pure memo of the workers' verdicts
# on that exact pair, so a score never depends on what was scored before.
_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = Lock()
_CACHE_MAX = 100_000


def _choice_letter(s: str, letters: str) -> tuple[str | None, str]:
    """The single option letter an answer names, or (None, why)."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s).strip().strip("$").strip()
    s = re.sub(r"(?i)^(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:=]?\s*", "", s)
    cls = f"[{re.escape(letters)}]"
    m = re.match(rf"^\(?({cls})\)?(?:[.:)\]]|\s|$)", s)
    if m:
        rest = s[m.end():]
        if re.search(rf"(?i)(?:\bor\b|\band\b|/|,|;|&)\s*(?:option\s+)?\(?{cls}\)?(?![A-Za-z])", rest):
            return None, "hedge"
        return m.group(1), "ok"
    found = set(re.findall(rf"(?<![A-Za-z])\(?({cls})\)?(?![A-Za-z])", s))
    if len(found) == 1:
        return found.pop(), "ok"
    return None, "hedge" if found else "no_answer"


_INT = re.compile(r"[-+]?\d+(?:\.0*)?", re.ASCII)


def _as_int(s: str) -> int | None:
    """The integer a plain integer literal names ("35", "1,000", "35.0", "$35$"), else None."""
    s = strip_thousands(s.strip().strip("$").strip())
    if len(s) > 40 or not _INT.fullmatch(s):
        return None
    return int(s.split(".")[0])


def _local(mode: str, gold: str, pred: str, letters: str) -> tuple[float | None, str]:
    """Score the string modes here (no sympy)."""
    if mode == "choice":
        g, _ = _choice_letter(gold, letters)
        if g is None:
            return None, "gold_unparsed"
        p, why = _choice_letter(pred, letters)
        return (1.0, "ok") if p == g else (0.0, why if p is None else "wrong")
    g = normalise_string(gold)
    if not g:
        return None, "gold_unparsed"
    return (1.0, "ok") if normalise_string(pred) == g else (0.0, "wrong")


def score_answers(golds: list, preds: list, modes: list[str], *, rel_tol: float = 1e-4, abs_tol: float = 1e-8,
                  deadline: float = 1.0, letters: str = "ABCDEFGHIJ", max_answer_chars: int | None = 2000,
                  explain: bool = False, float_rounding: int = 6, strict: bool = True,
                  allow_set_relation_comp: bool = False) -> list[dict]:
    """Score extracted answers against golds: one {score, why[, gold_repr, pred_repr]} per item. `preds` holds
    the extracted answer string, or None (nothing extracted), "\\0hedge" (hedge found during extraction), or
    "\\0boxes" + several different boxed answers joined by ", " (a list for a list gold, else a hedge)."""
    out: list[dict | None] = [None] * len(golds)
    remote: list[tuple[int, tuple, dict]] = []
    for i, (gold, pred, mode) in enumerate(zip(golds, preds, modes)):
        if mode not in MODES:
            raise ValueError(f"accuracy: unknown mode {mode!r}; choose from {MODES}")
        gold = "" if gold is None else str(gold).strip()
        if pred is not None and pred.startswith("\0boxes"):
            pred = pred[6:] if mode in ("math", "numeric") and not gold_is_single(gold) else "\0hedge"
        if not gold:
            out[i] = {"score": None, "why": "gold_unparsed"}
        elif pred is None or pred == "\0hedge":
            out[i] = {"score": 0.0, "why": "no_answer" if pred is None else "hedge"}
        elif max_answer_chars is not None and len(pred) > max_answer_chars:
            out[i] = {"score": 0.0, "why": "too_long"}
        elif mode in ("math", "numeric") and is_hedge(pred, gold):
            out[i] = {"score": 0.0, "why": "hedge"}
        elif mode in ("choice", "exact"):
            s, why = _local(mode, gold, pred, letters)
            out[i] = {"score": s, "why": why}
        else:
            verify_kw = {"float_rounding": float_rounding, "strict": strict,
                         "allow_set_relation_comp": allow_set_relation_comp}  # math-verify's verify() options
            key = (mode, gold, pred, rel_tol, abs_tol, float_rounding, strict, allow_set_relation_comp)
            with _CACHE_LOCK:
                hit = _CACHE.get(key) if not explain else None
            ints = _as_int(gold), _as_int(pred)
            if mode == "math" and None not in ints and not explain:  # two integers, the commonest case: exact
                out[i] = {"score": float(ints[0] == ints[1]), "why": "ok" if ints[0] == ints[1] else "wrong"}
            elif hit is not None:
                out[i] = dict(hit)
            else:
                remote.append((i, key, {"mode": mode, "gold": gold, "pred": pred, "rel_tol": rel_tol,
                                        "abs_tol": abs_tol, "explain": explain, "soft_s": 0.8 * deadline,
                                        "verify": verify_kw}))
    if remote:  # each distinct (gold, answer) once: a group often repeats an answer, pathological ones too
        unique = list({key: req for _, key, req in remote}.items())
        results = dict(zip([k for k, _ in unique], get_pool().map([r for _, r in unique], deadline=deadline)))
        with _CACHE_LOCK:
            for i, key, _ in remote:
                out[i] = dict(results[key])
            for key, res in results.items():
                if res.get("why") not in ("timeout", "error"):  # those may be load, not the answer: retry later
                    _CACHE[key] = {"score": res.get("score"), "why": res.get("why")}
            while len(_CACHE) > _CACHE_MAX:
                _CACHE.popitem(last=False)
    return out  # type: ignore[return-value]


def extract_answer(text: str, pattern: str | None = None, think_in_prompt: bool = False) -> str | None:
    """The completion's final answer text, None if missing or hedged (for callers such as cons@k voting)."""
    return _extract(text, pattern, think_in_prompt)[0]


@register("accuracy")
def accuracy_reward(completions, prompts=None, *, gold_column: str = "answer", mode: str = "math",
                    mode_column: str = "answer_mode", pattern: str | None = None, think_in_prompt: bool = False,
                    rel_tol: float = 1e-4, abs_tol: float = 1e-8, deadline: float = 1.0,
                    letters: str = "ABCDEFGHIJ", max_answer_chars: int | None = 2000, float_rounding: int = 6,
                    strict: bool = True, allow_set_relation_comp: bool = False,
                    **columns) -> list[float | None]:
    """1.0 if the completion's final answer matches column `gold_column`, else 0.0; None if the gold is unreadable.
    float_rounding, strict and allow_set_relation_comp are math-verify's verify() options, passed through."""
    if gold_column not in columns:
        raise KeyError(f"accuracy reward needs a {gold_column!r} column; got {sorted(columns)}")
    golds = list(columns[gold_column])
    item_modes = columns.get(mode_column)
    modes = [str(m) if m else mode for m in item_modes] if item_modes is not None else [mode] * len(golds)
    preds = []
    for c in completions:
        ans, why = _extract(completion_text(c), pattern, think_in_prompt, join_boxes=True)
        preds.append("\0hedge" if why == "hedge" else "\0boxes" + ans if why == "boxes" else ans)
    res = score_answers(golds, preds, modes, rel_tol=rel_tol, abs_tol=abs_tol, deadline=deadline,
                        letters=letters, max_answer_chars=max_answer_chars, float_rounding=float_rounding,
                        strict=strict, allow_set_relation_comp=allow_set_relation_comp)
    for kind in ("timeout", "error", "gold_unparsed", "hedge"):
        _stats.count(kind + "s" if kind != "gold_unparsed" else kind, sum(r.get("why") == kind for r in res))
    return [r.get("score") for r in res]
