"""Native torch sampler: batched decoding with a KV cache over the trainer's own model (zero-copy weights).

Prompts are left-padded and prefilled once; the cache is then repeated n times for the group, and rows that
finish (EOS or a stop string) are dropped from the batch so they stop costing compute.
"""

from __future__ import annotations

from typing import Iterable

import torch

from grpo.rollout.base import Completion, SamplingParams


def sample_next(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token [B], behaviour logprob [B] under softmax(logits / T), before top-k/top-p)."""
    scaled = logits.float() / sampling.temperature
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]
    filt = scaled
    if sampling.top_k is not None and sampling.top_k > 0 and sampling.top_k < filt.shape[-1]:
        kth = torch.topk(filt, sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(filt, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        filt = filt.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    tok = torch.multinomial(torch.softmax(filt, dim=-1), 1, generator=generator).squeeze(-1)  # [B]
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class NativeWorker:
    """RolloutWorker over a live transformers-style causal LM; `update_weights` is a no-op because the
    sampler and the trainer share the same parameters."""

    def __init__(self, model, tokenizer, max_batch_size: int = 256):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.eos_ids = set(_eos_ids(model, tokenizer))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] = ()) -> None:
        """Nothing to copy: generation reads the policy's own parameters."""

    def sleep(self) -> None:
        """No separate memory to free."""

    def wake(self) -> None:
        """No separate memory to restore."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """len(prompt_ids) * n completions, prompt-major."""
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[Completion] = []
            per_chunk = max(1, self.max_batch_size // n)
            for start in range(0, len(prompt_ids), per_chunk):
                out += self._generate_chunk(prompt_ids[start:start + per_chunk], start, n, sampling, gen)
            return out
        finally:
            self.model.train(was_training)

    def _generate_chunk(self, prompts, offset, n, sampling, gen) -> list[Completion]:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        P, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((P, L), pad, dtype=torch.long, device=device)
        attn = torch.zeros((P, L), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p):] = torch.tensor(p, device=device)
            attn[i, L - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # [P*n, V]
        if n > 1:
            cache.batch_repeat_interleave(n)
        attn = attn.repeat_interleave(n, dim=0)
        next_pos = pos[:, -1:].repeat_interleave(n, dim=0) + 1  # [B, 1]
        B = P * n
        rows = torch.arange(B, device=device)  # batch row -> request index
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        reason = ["length"] * B
        stops = sampling.stop or []
        tail = max((len(s) for s in stops), default=0) + 2
        for step in range(sampling.max_tokens):
            tok, lp = sample_next(logits, sampling, gen)
            keep = []
            for j, (r, t, l) in enumerate(zip(rows.tolist(), tok.tolist(), lp.tolist())):
                toks[r].append(t)
                lps[r].append(l)
                done = t in self.eos_ids
                if not done and stops:
                    text = self.tokenizer.decode(toks[r][-tail:], skip_special_tokens=True)
                    done = any(s in text for s in stops)
                if done:
                    reason[r] = "stop"
                else:
                    keep.append(j)
            if not keep or step == sampling.max_tokens - 1:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                rows, attn, next_pos, tok = rows[idx], attn[idx], next_pos[idx], tok[idx]
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache, use_cache=True)
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
        return [Completion(prompt_index=offset + r // n, token_ids=toks[r], text=_text(self.tokenizer, toks[r], stops),
                           logprobs=lps[r], finish_reason=reason[r]) for r in range(B)]


def _text(tokenizer, ids: list[int], stops: list[str]) -> str:
    """Decoded text, cut just after the first stop string (the stop string itself is kept)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) + len(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config (may be a list) and the tokenizer."""
    ids = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids += src if isinstance(src, (list, tuple)) else [src]
    return ids
