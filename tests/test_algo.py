"""GRPO maths against numbers worked out by hand."""

import math

import pytest
import torch

from grpo.algo import group_advantages, grpo_loss, kl_k3, masked_mean, token_logprobs


def test_group_of_four_rewards_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735 -> advantages +-0.86603
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, eps=0.0)
    assert torch.allclose(adv, torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254]), atol=1e-6)


def test_groups_are_normalised_separately_and_constant_groups_give_zero():
    r = torch.tensor([2.0, 0.0, 5.0, 5.0])  # groups of 2: [2, 0] and [5, 5]
    adv = group_advantages(r, 2, eps=0.0 + 1e-4)
    # group 1: mean 1, std sqrt(2) -> +-0.7071; group 2: no signal
    assert torch.allclose(adv[:2], torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]), atol=1e-4)
    assert torch.equal(adv[2:], torch.zeros(2))


def test_advantage_scales():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(r, 2, scale="none"), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    batch_std = r.std()
    assert torch.allclose(group_advantages(r, 2, scale="batch", eps=0.0), torch.tensor([1.0, -1.0, 0.0, 0.0]) / batch_std)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 2, scale="bogus")


def test_kl_k3_by_hand():
    # logp = log 0.5, ref = log 0.25: r = log(0.5) = -0.6931, exp(r) - r - 1 = 0.5 + 0.6931 - 1 = 0.19315
    kl = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl_k3(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


def test_clipped_loss_by_hand():
    # one sequence of 2 tokens, advantage +1. Token 1: ratio e^0.5 = 1.6487 > 1.2 -> clipped to 1.2.
    # Token 2: ratio e^-0.1 = 0.9048 (inside) -> 0.9048. Per-token loss -1.2 and -0.9048, mean -1.0524.
    logp = torch.tensor([[0.0, -0.1]])
    old = torch.tensor([[-0.5, 0.0]])
    mask = torch.ones(1, 2)
    loss, m = grpo_loss(logp, old, None, torch.tensor([1.0]), mask, epsilon_low=0.2, epsilon_high=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-(1.2 + math.exp(-0.1)) / 2, abs=1e-6)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert m["clip_ratio/low_mean"].item() == 0.0
    # negative advantage: ratio 0.5 < 0.8 is clipped from below; min(-0.5*-1, ...) -> loss = max(0.5, 0.8) = 0.8
    loss, m = grpo_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), None, torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.8, abs=1e-6)
    assert m["clip_ratio/low_mean"].item() == 1.0


def test_loss_types_weight_lengths_differently():
    # seq A: 1 token with per-token loss -a; seq B: 3 tokens. ratio 1 everywhere, so per-token loss = -adv.
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -0.5])
    grpo, _ = grpo_loss(logp, logp, None, adv, mask, loss_type="grpo")
    bnpo, _ = grpo_loss(logp, logp, None, adv, mask, loss_type="bnpo")
    dr, _ = grpo_loss(logp, logp, None, adv, mask, loss_type="dr_grpo")
    assert grpo.item() == pytest.approx((-1.0 + 0.5) / 2)  # per-sequence means, then mean: -0.25
    assert bnpo.item() == pytest.approx((-1.0 + 3 * 0.5) / 4)  # token mean: 0.125
    assert dr.item() == pytest.approx((-1.0 + 1.5) / (2 * 3))  # sum / (B * max_len)


def test_kl_term_and_gradient():
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    loss, m = grpo_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)
    expected_kl = (0.5 + math.log(2) - 1) / 2
    assert m["kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * expected_kl, abs=1e-6)
    loss.backward()
    # d/dlogp of -ratio*A (A=0) is 0; d/dlogp of k3 = -exp(ref - logp) + 1 -> token 1: 1 - 0.5 = 0.5, x beta/2
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * 0.5 / 2, abs=1e-6)
    assert logp.grad[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, None, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)


def test_policy_gradient_direction():
    # positive advantage must raise the log-prob of the sampled token
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    lp, ent = token_logprobs(logits, torch.tensor([[2]]))
    assert ent.item() == pytest.approx(math.log(3), abs=1e-6)
    loss, _ = grpo_loss(lp, lp.detach(), None, torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert logits.grad[0, 0, 2] < 0 < logits.grad[0, 0, 0]


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 100.0], [3.0, 5.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.0, 4.0]))
