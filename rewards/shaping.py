"""Length and repetition shaping rewards, added beside accuracy in a recipe.

- `overlong`: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_len - cache_len tokens,
  then linearly down to -1 at max_len, -1 beyond.
- `cosine`: cosine length scaling (Yeo et al. 2025, as in open-r1): correct answers earn more when short,
  wrong answers are punished less when long (so the model keeps thinking when unsure).
- `repetition`: n-gram repetition penalty (open-r1): max_penalty * (1 - distinct n-grams / all n-grams).
Length is len(completion_ids[i]) when the trainer passes token ids, else the number of whitespace words.
"""

from __future__ import annotations

import math

from rewards._text import completion_text
from rewards.registry import register


def _lengths(completions, columns) -> list[int]:
    ids = columns.get("completion_ids")
    if ids is not None:
        return [len(x) for x in ids]
    return [len(completion_text(c).split()) for c in completions]


@register("overlong")
def overlong_reward(completions, prompts=None, max_len: int = 4096, cache_len: int = 512, **columns) -> list[float]:
    """DAPO soft overlong punishment in [-1, 0]."""
    out = []
    for n in _lengths(completions, columns):
        if n <= max_len - cache_len:
            out.append(0.0)
        elif n <= max_len:
            out.append((max_len - cache_len - n) / cache_len)
        else:
            out.append(-1.0)
    return out


@register("cosine")
def cosine_reward(completions, prompts=None, max_len: int = 1000, min_value_wrong: float = -1.0,
                  max_value_wrong: float = -0.5, min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                  **columns) -> list[float | None]:
    """Accuracy scaled by a cosine of the length; None where accuracy does not apply (unreadable gold)."""
    from rewards.accuracy import accuracy_reward

    acc = accuracy_reward(completions, prompts, **columns)
    out: list[float | None] = []
    for a, n in zip(acc, _lengths(completions, columns)):
        if a is None:
            out.append(None)
            continue
        cos = math.cos(min(n / max_len, 1.0) * math.pi)
        lo, hi = (min_value_correct, max_value_correct) if a >= 1.0 else (max_value_wrong, min_value_wrong)
        out.append(lo + 0.5 * (hi - lo) * (1.0 + cos))
    return out


@register("repetition")
def repetition_reward(completions, prompts=None, ngram: int = 3, max_penalty: float = -1.0,
                      **columns) -> list[float]:
    """Penalty in [max_penalty, 0] for repeated word n-grams."""
    if max_penalty > 0:
        raise ValueError("repetition: max_penalty must be <= 0")
    out = []
    for c in completions:
        words = completion_text(c).lower().split()
        grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        out.append(0.0 if not grams else (1 - len(set(grams)) / len(grams)) * max_penalty)
    return out
