"""RewardSet: run a recipe's weighted rewards on one batch and gather TRL-named metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rewards.registry import RewardFn, resolve


@dataclass
class RewardSet:
    """Weighted sum of reward functions. `None` means "does not apply" and is left out of the sum and the
    mean (TRL's nansum rule); an item where every reward is None scores 0."""

    fns: list[tuple[str, RewardFn, float, dict]] = field(default_factory=list)

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "RewardSet":
        """specs: [{name: spec, weight: w, kwargs: {...}}] as a recipe writes them."""
        out = cls()
        for s in specs:
            spec = s["name"]
            label = s.get("label") or spec.rpartition(":")[2]
            out.fns.append((label, resolve(spec), float(s.get("weight", 1.0)), dict(s.get("kwargs") or {})))
        return out

    def __call__(self, completions: list, prompts: list, **columns) -> tuple[list[float], dict[str, list]]:
        """Returns (total per item, {label: raw per-item scores})."""
        n = len(completions)
        per: dict[str, list] = {}
        for label, fn, _, kwargs in self.fns:
            scores = list(fn(completions, prompts, **columns, **kwargs))
            if len(scores) != n:
                raise ValueError(f"reward {label!r} returned {len(scores)} scores for {n} completions")
            per[label] = scores
        total = []
        for i in range(n):
            vals = [w * per[label][i] for label, _, w, _ in self.fns if per[label][i] is not None]
            total.append(float(sum(vals)) if vals else 0.0)
        return total, per

    @staticmethod
    def metrics(per: dict[str, list]) -> dict[str, float]:
        """TRL's names: rewards/<name>/mean and /std over the items where the reward applied."""
        out: dict[str, float] = {}
        for label, scores in per.items():
            vals = [float(s) for s in scores if s is not None]
            mean = sum(vals) / len(vals) if vals else float("nan")
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            out[f"rewards/{label}/mean"] = mean
            out[f"rewards/{label}/std"] = math.sqrt(var)
            out[f"rewards/{label}/none_frac"] = 1 - len(vals) / max(len(scores), 1)
        return out
