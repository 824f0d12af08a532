"""End-to-end GRPO smoke runs on a tiny model: finite loss, weights move, checkpoints reload and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo import checkpoint, trainer
from grpo.algo import LOSS_TYPES
from grpo.config import GRPOConfig
from grpo.logprobs import build_batch, policy_logprobs
from tests.helpers import tiny_checkpoint


def _cfg(**kw) -> GRPOConfig:
    base = dict(data={"source": "synthetic:arith", "num_examples": 64}, group_size=4, prompts_per_step=4, steps=3,
                sampling={"max_tokens": 12, "stop": ["</answer>"]}, learning_rate=1e-3, beta=0.1, micro_batch_size=6, seed=0,
                rewards=[{"name": "accuracy"}, {"name": "format"}, {"name": "tests.helpers:length_reward"}])
    base.update(kw)
    return GRPOConfig.model_validate(base)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("base"))


def test_grpo_smoke_updates_weights_and_checkpoint_reloads(base, tmp_path):
    final = trainer.train(_cfg(), str(base), tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(k in r for k in ("reward", "rewards/accuracy/mean", "rewards/format/mean", "kl", "entropy", "loss",
                                    "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio"))
        assert torch.isfinite(torch.tensor(r["loss"])) and r["kl"] >= 0
        assert r["rollout/logprob_abs_diff"] < 1e-4  # the native sampler shares the trainer's weights
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(final)
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) > 0.8 * len(list(before.parameters()))
    assert (final / "tokenizer.json").is_file() and not list(final.parent.glob(".final.tmp-*"))


def test_micro_batching_does_not_change_the_gradient(base):
    """Same rollouts as one micro-batch of 16, as micro-batches of 3 rows of like length (each cut to its own
    columns) and as 3 rows in batch order: the same loss and gradient for every loss type, and the grouped
    micro-batches feed the model fewer token columns than the ones in batch order."""
    from grpo.logprobs import TokenLogprobs, micro_batches
    from grpo.models import hf
    from grpo.rollout import SamplingParams
    from grpo.rollout.native import NativeWorker
    from grpo.templates import render

    model, tok = hf.load(str(base))
    ids = tok([render("r1_zero", f"Compute {i} + 2") for i in range(4)], add_special_tokens=False).input_ids
    comps = NativeWorker(model, tok).generate(ids, 4, SamplingParams(max_tokens=12, seed=0))
    for i, c in enumerate(comps):  # ragged lengths, so that the three loss types really differ
        c.token_ids, c.logprobs = c.token_ids[: 3 + i % 9], c.logprobs[: 3 + i % 9]
    batch = build_batch(ids, comps, tok.pad_token_id)
    adv = torch.linspace(-1, 2, 16)
    scorer = TokenLogprobs(model)
    with torch.no_grad():
        ref = policy_logprobs(scorer, batch, slice(0, 16), 1.0)[0] - 0.05
    plans = {"whole": [torch.arange(16)], "grouped": micro_batches(batch["attention_mask"].sum(1), 3),
             "in order": list(torch.arange(16).split(3))}
    assert sorted(torch.cat(plans["grouped"]).tolist()) == list(range(16))
    fed = dict.fromkeys(plans, 0)  # token columns the model computed, over all micro-batches
    forward = scorer.forward
    variants = [(lt, {}) for lt in LOSS_TYPES] + [("grpo", {"tis": {"level": "sequence", "cap": 1.5}})]
    for loss_type, extra in variants:
        grads, losses = [], []
        for name, micro in plans.items():
            model.zero_grad()
            scorer.forward = lambda ids, *a, name=name, **k: (fed.__setitem__(name, fed[name] + ids.numel()),
                                                              forward(ids, *a, **k))[1]
            m = trainer.backward_batch(scorer, batch, micro, adv, None, ref, _cfg(loss_type=loss_type, **extra))
            grads.append([p.grad.clone() for p in model.parameters()])
            losses.append(m["loss"])
        for other, g in zip(losses[1:], grads[1:]):
            assert losses[0] == pytest.approx(other, rel=1e-5)
            for a, b in zip(grads[0], g):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), loss_type
    print(f"\ntoken columns fed per pass: {', '.join(f'{k} {v // len(variants)}' for k, v in fed.items())}")
    assert fed["grouped"] < fed["in order"] < fed["whole"]


def test_resume_continues_exactly(base, tmp_path):
    straight = trainer.train(_cfg(steps=3, save_every=1), str(base), tmp_path / "straight")
    # stop after 2 steps (as a crash would), then run again to 3: resumes from last/ at step 2
    trainer.train(_cfg(steps=2, save_every=1), str(base), tmp_path / "resumed")
    assert (tmp_path / "resumed" / "last" / "trainer_state" / "state.pt").is_file()
    state = torch.load(tmp_path / "resumed" / "last" / "trainer_state" / "state.pt", weights_only=False)["state"]
    assert (state["step"], state["cursor"]) == (1, 4)  # step 2's save is the final checkpoint, so "last" holds step 1
    resumed = trainer.train(_cfg(steps=3, save_every=1), str(base), tmp_path / "resumed")
    lines = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3]  # step 2 of the first run came after its last checkpoint: redone, logged once
    a, b = AutoModelForCausalLM.from_pretrained(straight), AutoModelForCausalLM.from_pretrained(resumed)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(x, y, atol=1e-5), n


def test_failed_save_keeps_previous_checkpoint(base, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ck = checkpoint.save(tmp_path / "ck", model, tok)
    original = (ck / "model.safetensors").read_bytes()

    class Boom(RuntimeError):
        pass

    def broken(path, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise Boom("disk full")

    model.save_pretrained = broken
    with pytest.raises(Boom):
        checkpoint.save(tmp_path / "ck", model, tok)
    assert (ck / "model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_sigkill_during_saves_never_leaves_half_checkpoint(base, tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from grpo import checkpoint
        m = AutoModelForCausalLM.from_pretrained({str(base)!r}); t = AutoTokenizer.from_pretrained({str(base)!r})
        i = 0
        while True:
            with torch.no_grad():
                m.model.embed_tokens.weight.fill_(float(i))
            checkpoint.save({str(tmp_path / "ck")!r}, m, t)
            print(i, flush=True); i += 1
    """))
    for delay in (2.5, 3.1, 3.7):
        p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        ck = tmp_path / "ck"
        if ck.exists():  # whatever survived is a whole checkpoint
            m = AutoModelForCausalLM.from_pretrained(ck)
            w = m.model.embed_tokens.weight
            assert torch.all(w == w.flatten()[0])


def test_user_reward_file_trains(base, tmp_path):
    """A reward written exactly as TRL documents it, named as path.py:function, drives GRPO."""
    f = tmp_path / "my_rewards.py"
    f.write_text(textwrap.dedent('''
        def reward_len(completions, **kwargs):
            return [-abs(20 - len(completion)) for completion in completions]
    '''))
    cfg = _cfg(steps=2, rewards=[{"name": f"{f}:reward_len", "weight": 1.0}, {"name": "format", "weight": 0.0}])
    trainer.train(cfg, str(base), tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/reward_len/mean" in r and r["rewards/reward_len/mean"] <= 0 for r in rows)
    assert rows[0]["reward"] == pytest.approx(rows[0]["rewards/reward_len/mean"])


def test_deepseek_moe_model_through_sft_and_grpo(tmp_path):
    """r1kit's own MoE/MLA model: built from a preset, pretrained, GRPO-trained with the expert-bias update,
    and the final checkpoint loads in transformers."""
    from grpo import sft
    from grpo.config import SFTConfig

    pre = SFTConfig.model_validate({"init": {"preset": "tiny", "num_hidden_layers": 2}, "train_tokenizer": {"vocab_size": 400},
                                    "data": {"num_examples": 200}, "steps": 3, "batch_size": 8, "learning_rate": 1e-3})
    base = sft.train(pre, None, tmp_path / "pre")
    assert json.loads((base / "config.json").read_text())["model_type"] == "deepseek_v3"
    final = trainer.train(_cfg(steps=2, routing_replay=True), str(base), tmp_path / "grpo")
    rows = [json.loads(l) for l in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # expert load, router entropy (at most log E nats) and, with replay, the share of tokens routed differently
    assert all(r["moe/load_max_over_mean"] >= 1.0 and 0 < r["moe/router_entropy"] <= math.log(16) + 1e-6
               and 0 <= r["moe/replay_mismatch_frac"] <= 0.01 for r in rows)
    hf_model = AutoModelForCausalLM.from_pretrained(final)
    assert type(hf_model).__name__ == "DeepseekV3ForCausalLM"
