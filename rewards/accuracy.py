"""`accuracy`: is the final answer mathematically equal to the gold answer? Verified with math-verify."""

from __future__ import annotations

import re

from math_verify import LatexExtractionConfig, ExprExtractionConfig, parse, verify

from rewards._text import completion_text
from rewards.registry import register

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = re.compile(r"\\boxed\{")


def extract_answer(text: str) -> str | None:
    """The single <answer> block's content, else the last \\boxed{} after </think>; text inside <think> never
    counts. Several answer blocks is a hedge and yields None."""
    blocks = _ANSWER.findall(text)
    if len(blocks) == 1:
        return blocks[0].strip()
    if len(blocks) > 1:
        return None
    tail = text.rsplit("</think>", 1)[1] if "</think>" in text else ("" if "<think>" in text else text)
    starts = [m.end() for m in _BOXED.finditer(tail)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(tail)):
        depth += {"{": 1, "}": -1}.get(tail[j], 0)
        if depth == 0:
            return tail[i:j].strip()
    return None


def _parse(s: str):
    return parse(s, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)


@register("accuracy")
def accuracy_reward(completions, prompts=None, answer=None, **columns) -> list[float | None]:
    """1.0 if the extracted answer verifies against `answer`, 0.0 if not; None where the gold does not parse."""
    if answer is None:
        raise KeyError("accuracy reward needs an 'answer' column")
    out: list[float | None] = []
    for c, gold in zip(completions, answer):
        gold_parsed = _parse(str(gold)) or _parse(f"${gold}$")
        if not gold_parsed:
            out.append(None)
            continue
        pred = extract_answer(completion_text(c))
        if pred is None:
            out.append(0.0)
            continue
        pred_parsed = _parse(pred) or _parse(f"${pred}$")
        out.append(1.0 if pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0)
    return out
