"""Per-token log-probs of a causal LM straight from its final hidden states through `fused_logprob`, so that GRPO
(policy, reference and old log-probs) and the SFT loss never hold [b, L, V] logits, where the model's head allows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grpo import algo
from grpo.kernels.logprob import fused_logprob
from grpo.models import DeepseekForCausalLM

# Config keys with which transformers 5.19 changes the logits after the LM head (Gemma-2/3 tanh softcap, Cohere
# logit_scale, Granite/MiniCPM3 logits_scaling, Falcon-H1 lm_head_multiplier, ...): hidden @ W.T is not the logits.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                   "output_multiplier")


def unwrap(lm: nn.Module) -> nn.Module:
    """The model a peft wrapper holds: its LoRA layers are injected in place, so calling it runs the adapter."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def fusable(lm: nn.Module) -> bool:
    """True when the logits are exactly final_hidden(lm) @ head.weight.T: a plain bias-free nn.Linear head and no
    head transform in the config; other models keep the logits path (fused_logprob would give other numbers)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    if not isinstance(lm, DeepseekForCausalLM) and lm.get_decoder() is lm:  # no separate backbone to run
        return False
    configs = [lm.config, lm.config.get_text_config()] if hasattr(lm.config, "get_text_config") else [lm.config]
    return not any(getattr(c, k, None) is not None for c in configs for k in HEAD_TRANSFORMS)


def final_hidden(lm: nn.Module, input_ids, attention_mask, position_ids, routed_experts=None) -> torch.Tensor:
    """[b, L, D]: the backbone's output after the final norm, i.e. what the LM head reads (no head run).
    routed_experts [b, L, M, K]: routing replay for r1kit's MoE model (DeepseekForCausalLM.hidden)."""
    if isinstance(lm, DeepseekForCausalLM):
        return lm.hidden(input_ids, attention_mask, position_ids, routed_experts=routed_experts)
    return lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state


class TokenLogprobs(nn.Module):
    """Wraps a causal LM to score given tokens. GRPO hands this module (not the LM) to DDP, so the backbone and
    the fused head both run inside DDP's forward and their gradients are all-reduced."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = unwrap(lm)
        self.fused = fusable(self.lm)

    def forward(self, input_ids, attention_mask, position_ids, targets, start: int, temperature: float,
                routed_experts=None):
        """input_ids, attention_mask, position_ids [b, L]; targets [b, L - start]: the tokens at columns start..L-1
        -> (log p(target) [b, L - start], entropy [b, L - start]) under softmax(logits / temperature). Targets < 0
        give logp 0. The entropy is detached (a metric, kept out of the gradient). routed_experts: routing replay."""
        replay = {} if routed_experts is None else {"routed_experts": routed_experts}
        if not self.fused:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **replay).logits[:, start - 1: -1]  # [b, L - start, V]
            logp, entropy = algo.token_logprobs(logits, targets.clamp_min(0), temperature)
            return torch.where(targets >= 0, logp, 0.0), entropy
        h = final_hidden(self.lm, input_ids, attention_mask, position_ids, routed_experts)[:, start - 1: -1]
        logp, entropy = fused_logprob(h.flatten(0, 1), self.lm.get_output_embeddings().weight, targets.flatten(),
                                      temperature)
        return logp.view_as(targets), entropy.detach().view_as(targets)


# ---------------------------------------------------------------- batches of (prompt, completion) rows


def build_batch(prompt_ids: list[list[int]], comps, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded completions, so every completion starts at column Lp.
    Returns input_ids/attention_mask/position_ids [B, Lp+Lc], completion_ids/completion_mask/behaviour_logprobs [B, Lc],
    and routed_experts [B, Lp+Lc, M, K] (-1 on padding) when every completion carries its sampler's routing."""
    Lp = max(len(prompt_ids[c.prompt_index]) for c in comps)
    Lc = max(1, max(len(c.token_ids) for c in comps))
    B = len(comps)
    ids = torch.full((B, Lp + Lc), pad_id, dtype=torch.long)
    attn = torch.zeros((B, Lp + Lc), dtype=torch.long)
    behaviour = torch.zeros((B, Lc))
    for i, c in enumerate(comps):
        p = prompt_ids[c.prompt_index]
        ids[i, Lp - len(p): Lp] = torch.tensor(p)
        ids[i, Lp: Lp + len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        attn[i, Lp - len(p): Lp + len(c.token_ids)] = 1
        if c.logprobs:
            behaviour[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    batch = {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
             "completion_ids": ids[:, Lp:], "completion_mask": attn[:, Lp:].float(), "prompt_len": Lp,
             "behaviour_logprobs": behaviour}
    if comps and all(c.routed_experts is not None for c in comps):
        routes = torch.full((B, Lp + Lc, *comps[0].routed_experts.shape[1:]), -1, dtype=torch.int16)
        for i, c in enumerate(comps):  # prompt + completion tokens, placed as the ids are
            n = len(prompt_ids[c.prompt_index])
            routes[i, Lp - n: Lp - n + len(c.routed_experts)] = c.routed_experts
        batch["routed_experts"] = routes
    return batch


def policy_logprobs(scorer, batch: dict, rows: slice | torch.Tensor, temperature: float,
                    replay: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies [b, Lc] of the completion tokens of batch[rows] (a slice or row indices);
    scorer: a TokenLogprobs around the model (or DDP around one). replay: route as the sampler did
    (batch["routed_experts"]). The rows run cut to their own columns: left padding no row of them has and
    completion columns past their longest completion are not computed (those log-probs are 0)."""
    Lp, Lc = batch["prompt_len"], batch["completion_ids"].shape[1]
    used = batch["attention_mask"][rows].any(0)  # [Lp + Lc]: a column some row attends to
    lo = min(int(used.int().argmax()), Lp - 1)  # first such column; every prompt has a token at Lp - 1
    hi = max(Lp + 1, len(used) - int(used.flip(0).int().argmax()))  # one past the last (at least one completion column)
    cols = slice(lo, hi)
    routes = batch["routed_experts"][rows][:, cols] if replay else None
    lp, ent = scorer(batch["input_ids"][rows][:, cols], batch["attention_mask"][rows][:, cols],
                     batch["position_ids"][rows][:, cols], batch["completion_ids"][rows][:, : hi - Lp], Lp - lo,
                     temperature, routed_experts=routes)
    return F.pad(lp, (0, Lc - (hi - Lp))), F.pad(ent, (0, Lc - (hi - Lp)))  # [b, Lc]


def micro_batches(lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices of micro-batches of at most `size` rows, longest rows first and rows of like length together,
    so that each, cut to its own columns (policy_logprobs), computes little padding (veRL groups rows by length
    too). lengths [B]: each row's token count. The first micro-batch is the largest: an out-of-memory shows at once."""
    return list(torch.argsort(lengths, descending=True, stable=True).split(size))


def in_order(micro: list[torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' per-row results [b_i, Lc], put back in the batch's row order -> [B, Lc]."""
    return torch.cat(parts)[torch.argsort(torch.cat(micro))]
