"""`format`: does the completion follow R1's <think>…</think><answer>…</answer> structure?"""

from __future__ import annotations

import re

from rewards._text import completion_text
from rewards.registry import register

_STRICT = re.compile(r"^\s*<think>(?P<think>(?:(?!</?think>|</?answer>).)+?)</think>\s*"
                     r"<answer>(?P<answer>(?:(?!</?think>|</?answer>).)+?)</answer>\s*$", re.S)


@register("format")
def format_reward(completions, prompts=None, think_in_prompt: bool = False, **columns) -> list[float]:
    """1.0 for exactly one non-empty think block followed by exactly one non-empty answer block and
    nothing after; else 0.0. `think_in_prompt`: the chat template already opened <think>."""
    out = []
    for c in completions:
        text = completion_text(c)
        if think_in_prompt and not text.lstrip().startswith("<think>"):
            text = "<think>" + text
        m = _STRICT.match(text)
        ok = m is not None and m.group("think").strip() and m.group("answer").strip()
        out.append(1.0 if ok else 0.0)
    return out
