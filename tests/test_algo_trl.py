"""grpo_loss against TRL's own loss code on identical random inputs, for every loss type both have: TRL's
GRPOTrainer._compute_loss runs on a stand-in trainer whose model hands back our log-probs, so the maths compared is
TRL's, line for line. Loss and its gradient w.r.t. the log-probs must agree to fp32 rounding.

Where TRL differs on purpose, the test maps the setting, as a user porting a config would:
- CISPO: TRL caps the importance weight at `epsilon_high` itself; r1kit at 1 + epsilon_high, like the clipped
  losses (so one epsilon_high means the same bound in every loss type).
- GSPO: TRL's importance_sampling_level="sequence" with loss_type="grpo"; in r1kit that is loss_type "gspo".
- dapo: TRL normalises by the generation batch's token count; on one batch without accumulation that is the token
  mean, which is what r1kit computes (the trainer weighs micro-batches so that they add up to it).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo import algo
from grpo.algo import grpo_loss, truncated_is_weights
from tolerance import assert_within, rounding_tol

# (r1kit loss_type, TRL loss_type, TRL importance_sampling_level)
CASES = [("grpo", "grpo", "token"), ("bnpo", "bnpo", "token"), ("dr_grpo", "dr_grpo", "token"),
         ("dapo", "dapo", "token"), ("gspo", "grpo", "sequence"), ("cispo", "cispo", "token")]


def _inputs(seed: int, B: int = 6, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * 0.3  # ratios spread well past 1 +- 0.2: clipping happens
    ref = logp + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    behaviour = old + torch.randn(B, T, generator=g) * 0.5
    return logp, old, ref, adv, mask, behaviour


@functools.cache
def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _trl_loss(loss_type, level, logp, old, ref, adv, mask, eps_low, eps_high, beta, is_ratio=None):
    """TRL 1.16's GRPOTrainer._compute_loss on a stand-in trainer (one process, no accumulation)."""
    from trl import GRPOTrainer

    B, T = mask.shape
    me = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, accelerator=_accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return GRPOTrainer._compute_loss(me, None, inputs)


def _both(ours_type, trl_type, level, seed, beta, tis=None):
    logp, old, ref, adv, mask, behaviour = _inputs(seed)
    eps_low, eps_high = 0.2, 0.28
    w = truncated_is_weights(old, behaviour, mask, **tis) if tis else None
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, _ = grpo_loss(a, old, ref, adv, mask, epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
                        loss_type=ours_type, max_len=mask.shape[1], is_weights=w)
    theirs = _trl_loss(trl_type, level, b, old, ref, adv, mask, eps_low,
                       1 + eps_high if trl_type == "cispo" else eps_high, beta, w)
    ours.backward()
    theirs.backward()
    return ours, theirs, a.grad, b.grad, mask


def _magnitude(loss_type: str, seed: int, beta: float, weight_cap: float = 1.0) -> float:
    """The loss's aggregation of |policy term| * weight_cap + beta |KL term|: the size of what is summed."""
    logp, old, ref, adv, mask, _ = _inputs(seed)
    kind = algo.LOSS_TYPES[loss_type]
    log_w = algo.log_importance_weights(logp, old, mask, kind.importance_sampling)
    per_token = (algo.OBJECTIVES[kind.objective](logp, log_w, adv[:, None], 0.2, 0.28).abs() * weight_cap
                 + beta * algo.kl_k3(logp, ref).abs())
    return algo.AGGREGATIONS[kind.aggregation](per_token, mask, mask.shape[1]).item()


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("ours_type,trl_type,level", CASES)
def test_grpo_loss_equals_trl(ours_type, trl_type, level, beta):
    for seed in range(3):
        ours, theirs, ga, gb, mask = _both(ours_type, trl_type, level, seed, beta)
        # the same per-token terms (a few products and exps each) summed in other orders over T tokens and B rows:
        # the magnitude is the loss's aggregation of |per-token term|; each gradient element is one such term
        # (its row's T-term mean for GSPO's sequence ratio)
        mag = _magnitude(ours_type, seed, beta)
        T, B = mask.shape[1], mask.shape[0]
        assert_within(ours.detach(), theirs.detach(), rounding_tol(mag, (T, B), roundings=8), f"{ours_type} loss")
        assert_within(ga, gb, rounding_tol(torch.maximum(ga.abs(), gb.abs()), (T,), roundings=8), f"{ours_type} grad")
        assert ga.abs().sum() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("level,mode", [("token", "truncate"), ("token", "mask"), ("sequence", "truncate"),
                                        ("sequence", "mask")])
def test_truncated_importance_sampling_equals_trl(level, mode):
    """TIS / MIS weights from the sampler's behaviour log-probs scale the policy term as TRL's
    vllm_importance_sampling_correction does (its ratio passed in, built by r1kit's truncated_is_weights)."""
    ours, theirs, ga, gb, mask = _both("grpo", "grpo", "token", 7, 0.04, {"level": level, "mode": mode, "cap": 2.0})
    # the same terms as test_grpo_loss_equals_trl, each scaled by the same weight: bounds as there, on |values|
    T, B = mask.shape[1], mask.shape[0]
    mag = _magnitude("grpo", 7, 0.04, weight_cap=2.0)  # weights are at most the cap
    assert_within(ours.detach(), theirs.detach(), rounding_tol(mag, (T, B), roundings=9))
    assert_within(ga, gb, rounding_tol(torch.maximum(ga.abs(), gb.abs()), (T,), roundings=9))


def test_truncated_is_weights_by_hand():
    """w = exp(old - behaviour) per token, capped (truncate) or zeroed above the cap (mask); per sequence, the
    exp of the summed log ratio over the sequence's own tokens."""
    old = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    behaviour = torch.tensor([[-1.0, -1.0, -1.0], [0.5, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    e = torch.exp(torch.tensor(1.0))
    tok = truncated_is_weights(old, behaviour, mask, level="token", mode="truncate", cap=2.0)
    assert torch.allclose(tok, torch.tensor([[2.0, 1.0, 1 / e.item()], [torch.exp(torch.tensor(-0.5)).item(), 1, 1]]))
    masked = truncated_is_weights(old, behaviour, mask, level="token", mode="mask", cap=2.0)
    assert masked[0, 0] == 0 and masked[0, 1] == 1
    seq = truncated_is_weights(old, behaviour, mask, level="sequence", mode="truncate", cap=10.0)
    assert torch.allclose(seq, torch.tensor([[1.0], [torch.exp(torch.tensor(-0.5)).item()]]))  # 1 + 0 - 1 = 0
