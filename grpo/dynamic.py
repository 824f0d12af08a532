"""DAPO's dynamic sampling: a prompt group whose G rewards all agree has zero advantage everywhere and teaches
nothing, so drop it and draw the next prompts, until the step has its P informative groups or `max_batches` draws
were made. With max_batches = 1 it is off: every group is kept, as plain GRPO does.

Simplification: when the cap is reached with fewer than P informative groups, the step trains on those; when it
found none at all, it trains on the last draw's groups (zero advantage: only the KL term acts), so that every
rank always runs a backward (DDP needs one per rank).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple


class Group(NamedTuple):
    """One prompt's G samples: the row index, the completions and their summed and per-reward scores."""

    row: int
    comps: list
    totals: list[float]
    per: dict[str, list]


def informative(group: Group, eps: float = 1e-6) -> bool:
    """Do the group's rewards disagree (max - min above eps)? Only then is any advantage non-zero."""
    return max(group.totals) - min(group.totals) > eps


def fill(draw: Callable[[int], list[Group]], prompts: int, max_batches: int) -> tuple[list[Group], dict[str, float]]:
    """Call draw(d) for d = 0, 1, ... (each returns the next `prompts` groups) and keep informative groups until
    `prompts` are kept or max_batches draws were made; returns (groups, metrics)."""
    kept: list[Group] = []
    last: list[Group] = []
    drawn = dropped = 0
    for d in range(max_batches):
        last = draw(d)
        drawn += 1
        if max_batches == 1:
            return last, {}
        good = [g for g in last if informative(g)]
        dropped += len(last) - len(good)
        kept += good[: prompts - len(kept)]
        if len(kept) == prompts:
            break
    groups = kept or last
    return groups, {"dynamic_sampling/batches": float(drawn), "dynamic_sampling/groups_dropped": float(dropped),
                    "dynamic_sampling/groups_kept": float(len(kept)),
                    "dynamic_sampling/filled": float(len(kept) == prompts)}


def flatten(groups: list[Group]) -> tuple[list[int], list, list[float], dict[str, list]]:
    """(row indices, completions re-indexed to their group's position, totals, per-reward scores) of the groups,
    prompt-major, as one draw of len(groups) prompts would give them."""
    rows = [g.row for g in groups]
    comps = [dataclasses.replace(c, prompt_index=i) for i, g in enumerate(groups) for c in g.comps]
    totals = [t for g in groups for t in g.totals]
    labels = groups[0].per.keys() if groups else []
    per = {label: [s for g in groups for s in g.per[label]] for label in labels}
    return rows, comps, totals, per
