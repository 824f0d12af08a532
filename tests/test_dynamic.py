"""DAPO's dynamic sampling (grpo/dynamic.py): groups whose rewards all agree are dropped and refilled from the next
prompts, up to the draw cap; the GRPO update then sees only informative groups."""

from __future__ import annotations

import json

from grpo import dynamic, trainer
from grpo.config import GRPOConfig
from tests.helpers import tiny_checkpoint


def _groups(rows: list[int], flat: set[int], G: int = 4) -> list[dynamic.Group]:
    """One group per row; rows in `flat` score 0 on every sample, the others spread."""
    return [dynamic.Group(r, [None] * G, [0.0] * G if r in flat else [float(j) for j in range(G)],
                          {"r": [0.0] * G}) for r in rows]


def test_fill_refills_to_the_batch_size_then_stops():
    """Half of each draw is uninformative: two draws fill the batch of 4, and only informative groups stay."""
    calls = []

    def draw(d):
        calls.append(d)
        rows = list(range(4 * d, 4 * d + 4))
        return _groups(rows, {r for r in rows if r % 2 == 0})

    groups, m = dynamic.fill(draw, 4, max_batches=5)
    assert calls == [0, 1] and [g.row for g in groups] == [1, 3, 5, 7]
    assert all(dynamic.informative(g) for g in groups)
    assert m == {"dynamic_sampling/batches": 2.0, "dynamic_sampling/groups_dropped": 4.0,
                 "dynamic_sampling/groups_kept": 4.0, "dynamic_sampling/filled": 1.0}


def test_fill_stops_at_the_cap_and_never_returns_nothing():
    mostly_flat = lambda d: _groups([10 * d + i for i in range(4)], {10 * d + i for i in range(3)})  # noqa: E731
    groups, m = dynamic.fill(mostly_flat, 4, max_batches=2)  # one informative group per draw
    assert [g.row for g in groups] == [3, 13] and m["dynamic_sampling/filled"] == 0.0
    all_flat = lambda d: _groups([d], {d})  # noqa: E731
    groups, m = dynamic.fill(all_flat, 1, max_batches=3)
    assert [g.row for g in groups] == [2] and m["dynamic_sampling/groups_kept"] == 0.0  # the last draw, not []
    groups, m = dynamic.fill(all_flat, 1, max_batches=1)  # off: everything, no metrics
    assert [g.row for g in groups] == [0] and m == {}


def half_flat(completions, answer, **kwargs):
    """0 for every sample of prompts with an even answer; the completion's length otherwise."""
    return [0.0 if int(a) % 2 == 0 else float(len(c)) for c, a in zip(completions, answer)]


def test_grpo_step_trains_only_on_informative_groups(tmp_path):
    """With half the prompts' groups flat, dynamic sampling refills every step to prompts_per_step informative
    groups (or reports the cap), and no group in the update has zero reward spread."""
    base = tiny_checkpoint(tmp_path / "base")
    cfg = GRPOConfig.model_validate(dict(
        data={"source": "synthetic:arith", "num_examples": 64}, group_size=4, prompts_per_step=4, steps=3,
        sampling={"max_tokens": 8}, beta=0.0, seed=0, rewards=[{"name": "tests.test_dynamic:half_flat"}],
        dynamic_sampling={"max_batches": 4}))
    trainer.train(cfg, str(base), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["dynamic_sampling/groups_dropped"] > 0 for r in rows)  # flat groups were really drawn
    for r in rows:
        assert r["frac_reward_zero_std"] == 0.0
        assert r["dynamic_sampling/groups_kept"] == 4 or r["dynamic_sampling/batches"] == 4
        print({k.split("/")[-1]: v for k, v in r.items() if k.startswith("dynamic_sampling/")})
