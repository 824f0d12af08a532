"""MoE routing replay (R3) on r1kit's DeepSeek model: the native sampler records the experts each token was routed
to, the trainer's forward reuses them, and the router still learns through the replayed experts' gate weights."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo import algo
from grpo.logprobs import TokenLogprobs, build_batch, policy_logprobs
from grpo.models.configs import tiny as tiny_cfg
from grpo.models.deepseek import DeepseekForCausalLM, MoE
from grpo.rollout import SamplingParams
from grpo.rollout.native import NativeWorker


def test_replayed_experts_carry_the_router_gradient():
    """Replaying the router's own choice changes nothing (bit for bit); replaying another choice uses those
    experts, and the gate's gradient reaches exactly the replayed experts' rows (sigmoid scores: a weight depends
    only on its own expert's row), never an expert that no token was sent to."""
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab_size=64, aux_loss_alpha=0.0)
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, cfg.hidden_size)
    free = moe(x)
    own = moe.last_topk_ids.clone()  # [10, K]
    assert torch.equal(moe(x, own), free)

    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    forced = torch.arange(K).expand(10, K).clone()  # every token to experts 0..K-1
    forced[::2] = -1  # even tokens: not recorded, routed by the model itself
    moe.gate.weight.grad = None
    out = moe(x, forced)
    assert not torch.allclose(out, free)
    out.square().sum().backward()
    used = torch.zeros(E, dtype=torch.bool)
    used[moe.last_topk_ids.flatten()] = True
    assert torch.equal(moe.last_topk_ids[1::2], forced[1::2]) and torch.equal(moe.last_topk_ids[::2], own[::2])
    g = moe.gate.weight.grad.abs().sum(-1)  # [E]
    assert (g[used] > 0).all() and (g[~used] == 0).all()


def _model_and_prompts(tmp_path):
    from rollout_models import build_tokenizer

    tok = build_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_cfg(vocab_size=len(tok), eos_token_id=tok.eos_token_id)).float()
    prompts = [tok(t)["input_ids"] for t in ("<think> one plus two", "answer: 12 + 7 =", "three")]
    return model, tok, prompts


def _gaps(model, batch, temperature: float) -> tuple[float, float, float]:
    """(mean |trainer - sampler| log-prob gap without replay, with replay, share of replayed tokens whose own
    routing differs) on the batch's completion tokens."""
    scorer = TokenLogprobs(model.train())
    mask = batch["completion_mask"]
    with torch.no_grad():
        free, _ = policy_logprobs(scorer, batch, slice(None), temperature)
        model.routing_stats()  # reset the counters: count the replayed pass alone
        replayed, _ = policy_logprobs(scorer, batch, slice(None), temperature, replay=True)
    stats = model.routing_stats()
    gap = lambda lp: float(algo.masked_mean((lp - batch["behaviour_logprobs"]).abs(), mask))  # noqa: E731
    return gap(free), gap(replayed), stats["moe/replay_mismatch_frac"]


def test_sampler_records_routing_and_replay_closes_a_bf16_sampler_gap(tmp_path):
    """The issue's check: fixed rollouts from a bf16 copy of the tiny MoE (as a bf16 vLLM would sample), scored by
    the fp32 trainer. Replaying the sampler's routing leaves a log-prob gap no larger than routing freely; both
    numbers and the routing-mismatch fraction are printed."""
    model, tok, prompts = _model_and_prompts(tmp_path)
    sampler = copy.deepcopy(model).to(torch.bfloat16).eval()
    comps = NativeWorker(sampler, tok, record_routing=True).generate(
        prompts, 4, SamplingParams(temperature=1.0, max_tokens=16, seed=3))
    M, K = len(model.routed_layers()), model.config.num_experts_per_tok
    for c in comps:  # prompt + completion tokens; the last sampled token is fed back only if its row was not done
        assert c.routed_experts.shape == (len(prompts[c.prompt_index]) + len(c.token_ids), M, K)
        assert (c.routed_experts[:-1] >= 0).all()
        assert c.finish_reason != "length" or (c.routed_experts[-1] == -1).all()
    batch = build_batch(prompts, comps, tok.pad_token_id)
    free, replayed, mismatch = _gaps(model, batch, 1.0)
    print(f"\nbf16 sampler, fp32 trainer: |logp gap| without replay {free:.3e}, with replay {replayed:.3e}; "
          f"routing mismatch {100 * mismatch:.1f}% of replayed tokens")
    assert mismatch > 0  # the bf16 sampler did route some tokens elsewhere: the comparison means something
    assert replayed <= free


def test_replay_with_the_samplers_own_model_reproduces_its_logprobs(tmp_path):
    """Native GRPO (sampler = trainer, fp32): the recorded routing is the trainer's own, so replay reproduces the
    behaviour log-probs as closely as free routing does (both at fp32 rounding: cache vs full forward)."""
    model, tok, prompts = _model_and_prompts(tmp_path)
    comps = NativeWorker(model, tok, record_routing=True).generate(
        prompts, 3, SamplingParams(temperature=0.8, max_tokens=12, seed=1))
    batch = build_batch(prompts, comps, tok.pad_token_id)
    free, replayed, mismatch = _gaps(model, batch, 0.8)
    # fp32: ~1e-6 per log-prob from summation order; a routing flip on a near-tie would show as a larger gap
    assert replayed <= 1e-4 and free <= 1e-4 and mismatch <= 0.01


def test_routing_replay_is_refused_where_it_cannot_work(tmp_path):
    from grpo.config import GRPOConfig
    from rollout_models import build_llama

    with pytest.raises(ValueError, match="routing_replay needs rollout: native"):
        GRPOConfig.model_validate({"routing_replay": True, "rollout": "vllm"})
    model, tok = build_llama(str(tmp_path))  # dense: nothing to record
    with pytest.raises(ValueError, match="routing replay needs r1kit's DeepSeek MoE model"):
        NativeWorker(model, tok, record_routing=True)
