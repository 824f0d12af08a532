"""`format`: does the completion follow R1's `<think>…</think><answer>…</answer>` structure?

Variants (kwarg `variant`): `strict` (default, 1/0), `soft` (partial credit from independent regexes), `tag_count`
(0.25 per tag that appears exactly once, open-r1's count reward, so repeated blocks lose credit).
`think_in_prompt=True` is for chat templates that already end the prompt with `<think>` (DeepSeek-R1's
template does): the opening tag is then counted as present and must not appear again.
"""

from __future__ import annotations

import re

from rewards._text import completion_text
from rewards.registry import register

_BODY = r"(?:(?!</?think>|</?answer>).)*?"
_STRICT = re.compile(rf"^\s*<think>(?P<think>{_BODY})</think>\s*<answer>(?P<answer>{_BODY})</answer>\s*$", re.S)
VARIANTS = ("strict", "soft", "tag_count")


def _with_open_think(text: str, think_in_prompt: bool) -> str:
    """Put back the <think> the chat template already emitted (a second one is then a repeat)."""
    return "<think>" + text if think_in_prompt else text


def strict(text: str) -> float:
    """Exactly one non-empty think block, then exactly one non-empty answer block, then nothing."""
    m = _STRICT.match(text)
    return 1.0 if m and m.group("think").strip() and m.group("answer").strip() else 0.0


def soft(text: str) -> float:
    """Partial credit, 0.25 each: a closed think block; an answer block; think before answer; nothing after
    the answer. Each tag appearing more than once costs the whole credit (no stacking blocks)."""
    if any(text.count(t) > 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    think = re.search(r"<think>(.+?)</think>", text, re.S)
    answer = re.search(r"<answer>(.+?)</answer>", text, re.S)
    score = 0.25 * bool(think and think.group(1).strip()) + 0.25 * bool(answer and answer.group(1).strip())
    if think and answer and think.end() <= answer.start():
        score += 0.25
    if answer and not text[answer.end():].strip():
        score += 0.25
    return score


def tag_count(text: str) -> float:
    """0.25 for each of the four tags that appears exactly once."""
    return 0.25 * sum(text.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))


@register("format")
def format_reward(completions, prompts=None, variant: str = "strict", think_in_prompt: bool = False,
                  **columns) -> list[float]:
    """Score each completion's structure with `variant` (strict | soft | tag_count)."""
    fn = {"strict": strict, "soft": soft, "tag_count": tag_count}.get(variant)
    if fn is None:
        raise ValueError(f"format: unknown variant {variant!r}; choose from {VARIANTS}")
    return [fn(_with_open_think(completion_text(c), think_in_prompt)) for c in completions]
