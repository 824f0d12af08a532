"""Small helpers both rollout engines share: the context-window policy and per-request seeds."""

from __future__ import annotations

_MASK64 = 2**64 - 1


def fit_prompt(ids: list[int], max_tokens: int, max_model_len: int, truncate: str) -> list[int]:
    """Make prompt + max_tokens fit the context window: raise (truncate="error") or keep the last tokens
    (truncate="left"). Never a silent cut."""
    room = max_model_len - max_tokens
    if len(ids) <= room:
        return list(ids)
    if truncate == "left" and room > 0:
        return list(ids[-room:])
    raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the context window "
                     f"max_model_len={max_model_len}; shorten the prompt, lower max_tokens, raise max_model_len, "
                     "or set truncate='left'")


def request_seed(seed: int, index: int) -> int:
    """A 62-bit seed for request `index` of a call seeded `seed` (SplitMix64 of both), so calls with nearby seeds
    (seed, seed+1, ...) do not share any request's random stream."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 2
