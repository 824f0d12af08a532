"""RewardSet: run a recipe's weighted rewards on one batch and gather TRL-named metrics.

Rewards are called the way TRL calls them, by keyword (`fn(prompts=..., completions=..., **columns, **kwargs)`),
so a TRL reward written as `def f(completions, **kwargs)` works unchanged. `async def` rewards run concurrently
with each other (one event loop on a helper thread) while the plain ones run in the calling thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rewards import _stats
from rewards.registry import RewardFn, resolve

log = logging.getLogger(__name__)


class PerReward(dict):
    """{label: per-item scores}, plus `.counts` {label: Counter(timeouts, errors, gold_unparsed, ...)}."""

    counts: dict[str, Counter]


@dataclass
class RewardSpec:
    label: str
    fn: RewardFn
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    on_error: str = "raise"  # or "none": a reward that raises gives None for the batch and counts errors


@dataclass
class RewardSet:
    """Weighted sum of reward functions. `None` means "does not apply" and is left out of the sum and the
    mean (TRL's nansum rule); an item where every reward is None scores 0."""

    fns: list[RewardSpec] = field(default_factory=list)

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "RewardSet":
        """specs: [{name: spec, weight: w, kwargs: {...}, label?: str, on_error?: raise|none}] as a recipe
        writes them. Labels default to the function's name part and are made unique."""
        out = cls()
        seen: Counter = Counter()
        for s in specs:
            spec = s["name"]
            label = s.get("label") or spec.rpartition(":")[2]
            seen[label] += 1
            if seen[label] > 1:
                label = f"{label}_{seen[label]}"
            on_error = s.get("on_error", "raise")
            if on_error not in ("raise", "none"):
                raise ValueError(f"reward {spec!r}: on_error must be 'raise' or 'none'")
            out.fns.append(RewardSpec(label, resolve(spec), float(s.get("weight", 1.0)),
                                      dict(s.get("kwargs") or {}), on_error))
        return out

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.fns]

    @staticmethod
    def _failed(r: RewardSpec, c: Counter, n: int) -> list:
        """A reward raised: re-raise (default), or log it, count n errors and score the batch None."""
        if r.on_error == "raise":
            raise
        log.exception("reward %s raised; scoring the batch None", r.label)
        c["errors"] += n
        return [None] * n

    def _call_sync(self, r: RewardSpec, args: dict, counts: dict) -> list:
        with _stats.collecting() as c:
            counts[r.label] = c
            try:
                return r.fn(**args, **r.kwargs)
            except Exception:
                return self._failed(r, c, len(args["completions"]))

    async def _call_async(self, r: RewardSpec, args: dict, counts: dict) -> list:
        with _stats.collecting() as c:
            counts[r.label] = c
            try:
                return await r.fn(**args, **r.kwargs)
            except Exception:
                return self._failed(r, c, len(args["completions"]))

    def __call__(self, completions: list, prompts: list, **columns) -> tuple[list[float], PerReward]:
        """Returns (total per item, {label: raw per-item scores}); `per.counts` holds each reward's counters."""
        n = len(completions)
        raw: dict[str, list] = {}
        counts: dict[str, Counter] = {}
        base = {**columns, "prompts": prompts, "completions": completions}
        args_for = {r.label: {k: v for k, v in base.items() if k not in r.kwargs} for r in self.fns}
        async_fns = [r for r in self.fns if inspect.iscoroutinefunction(r.fn)]
        failure: list[BaseException] = []

        def run_async():
            async def gather():
                return await asyncio.gather(*(self._call_async(r, args_for[r.label], counts) for r in async_fns))
            try:
                for r, s in zip(async_fns, asyncio.run(gather())):
                    raw[r.label] = s
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(e)

        helper = threading.Thread(target=run_async, name="r1kit-async-rewards") if async_fns else None
        if helper:
            helper.start()
        try:
            for r in self.fns:
                if r not in async_fns:
                    raw[r.label] = self._call_sync(r, args_for[r.label], counts)
        finally:
            if helper:
                helper.join()
        if failure:
            raise failure[0]
        per = PerReward()
        for r in self.fns:
            scores = list(raw[r.label])
            if len(scores) != n:
                raise ValueError(f"reward {r.label!r} returned {len(scores)} scores for {n} completions")
            per[r.label] = [None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s)
                            for s in scores]
        per.counts = counts
        total = []
        for i in range(n):
            vals = [r.weight * per[r.label][i] for r in self.fns if per[r.label][i] is not None]
            total.append(float(sum(vals)) if vals else 0.0)
        return total, per

    @staticmethod
    def metrics(per: dict[str, list]) -> dict[str, float]:
        """TRL's names rewards/<name>/mean and /std (over the items where the reward applied), plus
        rewards/<name>/none_frac, /timeouts, /errors and any other counter the reward reported."""
        out: dict[str, float] = {}
        counts = getattr(per, "counts", {})
        for label, scores in per.items():
            vals = [float(s) for s in scores if s is not None]
            mean = sum(vals) / len(vals) if vals else float("nan")
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            out[f"rewards/{label}/mean"] = mean
            out[f"rewards/{label}/std"] = math.sqrt(var)
            out[f"rewards/{label}/none_frac"] = 1 - len(vals) / max(len(scores), 1)
            c = counts.get(label, Counter())
            for kind in sorted({"timeouts", "errors", *c}):
                out[f"rewards/{label}/{kind}"] = float(c.get(kind, 0))
        return out
