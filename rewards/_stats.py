"""Per-reward counters (timeouts, errors, gold answers that do not parse, hedges) that a reward reports while
it runs; RewardSet collects them per reward and turns them into metrics. Outside a RewardSet they go to
`GLOBAL`, so a direct call can still be inspected."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar

GLOBAL: Counter = Counter()
_current: ContextVar[Counter | None] = ContextVar("r1kit_reward_stats", default=None)


def count(kind: str, n: int = 1) -> None:
    """Add n to counter `kind` of the reward now running."""
    if n:
        c = _current.get()
        (GLOBAL if c is None else c)[kind] += n


@contextmanager
def collecting():
    """Collect the counts reported inside this block (and in threads/tasks started from it) into a Counter."""
    c: Counter = Counter()
    token = _current.set(c)
    try:
        yield c
    finally:
        _current.reset(token)
