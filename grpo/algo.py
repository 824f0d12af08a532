"""GRPO maths as pure tensor functions: group-normalised advantages, the k3 KL estimator, the clipped loss.

Shapes: B completions (= P prompts x G group size), T completion tokens (right-padded), mask [B, T] in {0, 1}.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [B] -> advantages [B]: reward minus its group's mean, divided by the group's std (DeepSeekMath
    GRPO; unbiased std as TRL), by the batch std ("batch", Dr. GRPO-style robustness), or not at all ("none")."""
    g = rewards.view(-1, group_size).float()  # [P, G]
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    elif scale != "none":
        raise ValueError(f"advantage scale must be group, batch or none, not {scale!r}")
    return centred.reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman): exp(r) - r - 1 with r = ref - logp; >= 0, unbiased."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over `dim`, or everything)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              loss_type: str = "grpo", max_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy loss plus beta * k3 KL. logp/old_logp/ref_logp/mask [B, T], advantages [B].

    loss_type: "grpo" averages tokens within each sequence then sequences (R1 / DeepSeekMath); "bnpo" averages
    over all tokens of the batch (DAPO's token-level loss); "dr_grpo" sums tokens and divides by B * max_len
    (Dr. GRPO, no length bias). Returns (scalar loss, detached metrics)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)  # [B, T]
    kl = None
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    else:
        raise ValueError(f"loss_type must be grpo, bnpo or dr_grpo, not {loss_type!r}")
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)  # clipped from below: the min picks the clipped term
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(low.to(mask.dtype), mask),
            "clip_ratio/high_mean": masked_mean(high.to(mask.dtype), mask),
            "clip_ratio/region_mean": masked_mean((low | high).to(mask.dtype), mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], targets [B, T] -> (log p(target) [B, T], entropy [B, T]) under softmax(logits / T)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
