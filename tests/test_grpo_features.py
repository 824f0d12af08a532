"""GRPO loop features: trackers (tensorboard read back with tensorboard's own reader, wandb offline), the sample
table, reference reset, the non-finite guard, per-phase timers."""

from __future__ import annotations

import json

import pytest
import torch

from grpo import trainer
from grpo.config import GRPOConfig
from tests import helpers
from tests.helpers import tiny_checkpoint

_CALLS = {"n": 0}


def inf_on_second_call(completions, **kwargs):
    """A reward that breaks once: +inf for the whole second batch it scores (NaN would count as "no score"), so
    that batch's advantages, loss and gradient are NaN."""
    _CALLS["n"] += 1
    return [float("inf") if _CALLS["n"] == 2 else float(len(c)) for c in completions]


def always_inf(completions, **kwargs):
    return [float("inf")] * len(completions)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("base"))


def _cfg(**kw) -> GRPOConfig:
    base = dict(data={"source": "synthetic:arith", "num_examples": 32}, group_size=4, prompts_per_step=2, steps=3,
                sampling={"max_tokens": 8}, beta=0.1, seed=0, rewards=[{"name": "tests.helpers:length_reward"}])
    return GRPOConfig.model_validate({**base, **kw})


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_and_sample_table_read_back(base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer.train(_cfg(report_to=["jsonl", "tensorboard"], sample_table_every=2), str(base), tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = [r for r in _rows(tmp_path / "run") if "reward" in r]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    for phase in ("time/generate", "time/reward", "time/ref", "time/update", "time/weight_sync"):
        assert phase in acc.Tags()["scalars"] and all(r[phase] >= 0 for r in rows)
    assert "samples/text_summary" in acc.Tags()["tensors"]  # the table of sample completions, at step 2
    table = [r for r in _rows(tmp_path / "run") if "samples" in r]
    assert [t["step"] for t in table] == [2] and set(table[0]["samples"][0]) == {"prompt", "completion", "reward"}


def test_wandb_offline_writes_a_run(base, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer.train(_cfg(steps=2, report_to=["wandb"]), str(base), tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_reference_reset_makes_the_next_kl_zero(base, tmp_path):
    """ref_reset_every=2: after step 2 the reference is the policy, so step 3 measures KL 0 (identical weights);
    without the reset it does not."""
    trainer.train(_cfg(ref_reset_every=2, learning_rate=1e-3), str(base), tmp_path / "reset")
    trainer.train(_cfg(learning_rate=1e-3), str(base), tmp_path / "plain")
    rows, plain = _rows(tmp_path / "reset"), _rows(tmp_path / "plain")
    assert rows[2]["kl"] == 0.0 and plain[2]["kl"] > 0.0 and rows[1]["kl"] == plain[1]["kl"]


def test_nonfinite_gradient_is_skipped_then_stops(base, tmp_path):
    _CALLS["n"] = 0
    trainer.train(_cfg(rewards=[{"name": "tests.test_grpo_features:inf_on_second_call"}]), str(base), tmp_path / "a")
    assert [r["nonfinite/skipped"] for r in _rows(tmp_path / "a")] == [0.0, 1.0, 0.0]
    with pytest.raises(FloatingPointError, match="not finite in 2 steps in a row"):
        trainer.train(_cfg(rewards=[{"name": "tests.test_grpo_features:always_inf"}], max_nonfinite_steps=2),
                      str(base), tmp_path / "b")


def test_resume_with_reference_reset_is_exact(base, tmp_path):
    """The reference of the last reset travels in trainer_state: a run stopped after step 3 and resumed to 4
    (reset at step 2, last saved at 3) ends with the weights of a straight 4-step run, bit for bit."""
    from transformers import AutoModelForCausalLM

    cfg = dict(save_every=1, ref_reset_every=2, learning_rate=1e-3)
    straight = trainer.train(_cfg(steps=4, **cfg), str(base), tmp_path / "straight")
    trainer.train(_cfg(steps=3, **cfg), str(base), tmp_path / "resumed")  # last/ holds step 2, after the reset
    resumed = trainer.train(_cfg(steps=4, **cfg), str(base), tmp_path / "resumed")
    a, b = AutoModelForCausalLM.from_pretrained(straight), AutoModelForCausalLM.from_pretrained(resumed)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert [r["kl"] for r in _rows(tmp_path / "straight")][2:] == [r["kl"] for r in _rows(tmp_path / "resumed")][2:]



def test_rewards_are_scored_while_the_reference_pass_runs(base, tmp_path):
    def on_forward(module, args):
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):  # only the frozen reference has such modules
            helpers.REF_STARTED.set()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    try:
        trainer.train(_cfg(rewards=[{"name": "tests.helpers:waits_for_reference_pass"}]), str(base),
                      tmp_path / "run")
    finally:
        handle.remove()
    seen = helpers.REWARD_CALLS
    assert len(seen) == 3, seen  # one scoring per step
    assert all(name.startswith("r1kit-rewards") and started for name, started in seen), seen
    rows = [r for r in _rows(tmp_path / "run") if "reward" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
