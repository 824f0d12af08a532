"""GRPO maths as pure tensor functions: group-normalised advantages, the k3 KL estimator, the clipped loss, and
the distillation divergences (forward KL, TRL-style generalised JSD) with on-policy distillation's per-token advantage.

Shapes: B completions (= P prompts x G group size), T completion tokens (right-padded), mask [B, T] in {0, 1}.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


# ---------------------------------------------------------------- policy losses: registered by name, no if-chain
# A loss type is (policy objective, aggregation, importance-sampling level). Objectives and aggregations are pure
# functions; grpo_loss composes the one its loss type names (veRL's policy-loss registry is the model).


def clip_objective(logp, log_w, adv, epsilon_low, epsilon_high):
    """PPO's clipped surrogate, per token: -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A), w = exp(log_w);
    log_w [B, T] (token) or [B, 1] (sequence, GSPO), adv [B, 1] or [B, T]."""
    w = torch.exp(log_w)
    return -torch.min(w * adv, torch.clamp(w, 1 - epsilon_low, 1 + epsilon_high) * adv)


def cispo_objective(logp, log_w, adv, epsilon_low, epsilon_high):
    """CISPO (MiniMax-M1), per token: -sg(min(w, 1 + eps_high)) A log p: the importance weight is clipped and
    detached, the gradient flows through log p of every token (none is dropped by clipping)."""
    return -torch.clamp(torch.exp(log_w), max=1 + epsilon_high).detach() * adv * logp


OBJECTIVES = {"clip": clip_objective, "cispo": cispo_objective}


def sequence_mean(per_token, mask, max_len):
    """Mean over each sequence's tokens, then over sequences (DeepSeekMath / R1 GRPO)."""
    return masked_mean(per_token, mask, dim=1).mean()


def token_mean(per_token, mask, max_len):
    """Mean over all tokens of the batch (DAPO's token-level loss: long sequences weigh more)."""
    return masked_mean(per_token, mask)


def constant_normaliser(per_token, mask, max_len):
    """Sum over tokens divided by B * max_len (Dr. GRPO: no length or std bias)."""
    return (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))


AGGREGATIONS = {"sequence_mean": sequence_mean, "token_mean": token_mean, "constant": constant_normaliser}


class LossType(NamedTuple):
    objective: str
    aggregation: str
    importance_sampling: str  # "token", "sequence" (GSPO), or "off" (w = 1, pure on-policy gradient)


LOSS_TYPES = {
    "grpo": LossType("clip", "sequence_mean", "token"),  # R1 / DeepSeekMath
    "bnpo": LossType("clip", "token_mean", "token"),
    "dapo": LossType("clip", "token_mean", "token"),  # DAPO: token mean over the whole batch (= bnpo here)
    "dr_grpo": LossType("clip", "constant", "token"),
    "gspo": LossType("clip", "sequence_mean", "sequence"),  # GSPO: one length-normalised ratio per sequence
    "cispo": LossType("cispo", "token_mean", "token"),
}


def log_importance_weights(logp, old_logp, mask, level: str) -> torch.Tensor:
    """log(pi / pi_old): per token [B, T]; per sequence [B, 1] as GSPO's length-normalised mean of the token log
    ratios; "off": zeros (w = 1) with no gradient through the weight."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_mean(log_ratio, mask, dim=1)[:, None]
    if level == "off":
        return torch.zeros_like(log_ratio)
    raise ValueError(f"importance_sampling must be token, sequence or off, not {level!r}")


def truncated_is_weights(old_logp, behaviour_logp, mask, *, level: str = "token", mode: str = "truncate",
                         cap: float = 2.0) -> torch.Tensor:
    """Rollout/trainer mismatch correction (TIS / MIS): w = pi_old / pi_sampler per token [B, T], or per sequence
    [B, 1] as exp(sum of token log ratios); "truncate" caps w at `cap`, "mask" zeroes weights above it (IcePop-style
    masking). Detached: a fixed per-token scale of the loss."""
    diff = ((old_logp - behaviour_logp) * mask).detach()
    log_w = diff.sum(-1, keepdim=True) if level == "sequence" else diff
    w = torch.exp(log_w)
    if mode == "truncate":
        return w.clamp(max=cap)
    if mode == "mask":
        return w.masked_fill(w > cap, 0.0)
    raise ValueError(f"tis mode must be truncate or mask, not {mode!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              loss_type: str = "grpo", max_len: int | None = None, importance_sampling: str | None = None,
              is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss of `loss_type` (LOSS_TYPES) plus beta * k3 KL, both scaled per token by `is_weights` where given
    (TIS: truncated_is_weights) only for the policy term. logp/old_logp/ref_logp/mask [B, T], advantages [B] (one
    per sequence, GRPO) or [B, T] (per token, e.g. on-policy distillation). importance_sampling overrides the loss
    type's level (token | sequence | off). Returns (scalar loss, detached metrics)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    kind = LOSS_TYPES[loss_type]
    mask = mask.to(logp.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    log_w = log_importance_weights(logp, old_logp, mask, importance_sampling or kind.importance_sampling)
    per_token = OBJECTIVES[kind.objective](logp, log_w, adv, epsilon_low, epsilon_high)  # [B, T]
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = AGGREGATIONS[kind.aggregation](per_token, mask, max_len)
    with torch.no_grad():
        w = torch.exp(log_w).expand_as(mask)
        if kind.objective == "cispo":  # the weight is capped above only
            low, high = torch.zeros_like(mask, dtype=torch.bool), (w > 1 + epsilon_high) & (adv > 0)
        else:
            low = (w < 1 - epsilon_low) & (adv < 0)  # clipped from below: the min picks the clipped term
            high = (w > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(low.to(mask.dtype), mask),
            "clip_ratio/high_mean": masked_mean(high.to(mask.dtype), mask),
            "clip_ratio/region_mean": masked_mean((low | high).to(mask.dtype), mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
        if is_weights is not None:
            iw = is_weights.expand_as(mask)
            metrics["tis/weight_mean"] = masked_mean(iw, mask)
            metrics["tis/weight_max"] = (iw * mask).max()
    return loss, metrics


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], targets [B, T] -> (log p(target) [B, T], entropy [B, T]) under softmax(logits / T)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------- distillation: rows of logits [N, V] -> per-row [N]


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_t || p_s) = sum_v p_t,v (log p_t,v - log p_s,v) per row, p = softmax(z / temperature); [N, V] -> [N]."""
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Generalised JSD per row as TRL's GKD (Agarwal et al. 2024, eq. 1): beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    with m = beta p_t + (1 - beta) p_s; TRL's end points: beta = 0 is KL(p_t || p_s), beta = 1 is KL(p_s || p_t)."""
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, V]
    lt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1:
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # log m
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


DIVERGENCES = {"forward_kl": forward_kl, "jsd": generalized_jsd}  # distill `loss:` / `on_policy_loss: jsd`


def reverse_kl_advantages(logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Per-token advantage of on-policy distillation (Thinking Machines, discount 0): -(log p_s - log p_t) [B, T];
    its expectation under the student's samples is minus the per-token reverse KL(p_s || p_t)."""
    return -(logp - teacher_logp).detach()
