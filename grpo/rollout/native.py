"""Native torch sampler: batched decoding with a KV cache over the trainer's own model (zero-copy weights).

Prompts are length-bucketed into chunks of at most `max_batch_size` rows, left-padded and prefilled once; each
prompt's cache rows are then repeated n times for the group. Decoding writes keys/values into preallocated buffers
(transformers models) instead of re-concatenating the cache every step, and finished rows (EOS, a stop string)
are compacted out of the batch once a quarter of it is done, so they stop costing compute. Finished slots are not
refilled with new prompts mid-flight (no full continuous batching); the next length bucket starts afterwards.

With `dtype` (runtime.sampler_dtype) the sampler holds its own copy of the weights in that dtype, refreshed by
update_weights after every optimizer step, as a vLLM engine does; its KV cache is then bf16 too, which the C
decoding attention (grpo/kernels/cpu_attention.py) reads at half the bytes of fp32.

Sampling is the inverse CDF of the filtered softmax at one uniform per row and step, drawn from a counter-based
SplitMix64 stream keyed by (request seed, step), so sample j of prompt i (seed `request_seed(sampling.seed, i*n + j)`,
i counted from sampling.first_index)
is the same whatever it was batched with.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from grpo.rollout.decode import PlainDecoder
from grpo.rollout.base import Completion, SamplingParams
from grpo.rollout.common import fit_prompt, request_seed

DRAWS = 64  # decoding steps whose random draws are made in one pass
_GOLDEN, _M1, _M2 = (0x9E3779B97F4A7C15 - 2**64, 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def uniform(keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """keys [B] int64 -> U(0,1) [B] float32 (24 random bits): output number `step` of each key's SplitMix64
    stream, so a request's draws depend only on its seed and the step, never on what it is batched with.
    step may be a tensor of steps [T]: then [B, T], all of a chunk's draws in one pass (integer maths: the same bits)."""
    if isinstance(step, torch.Tensor):
        keys, step = keys[:, None], step.to(torch.int64)[None]
    else:
        step = torch.tensor(step, dtype=torch.int64, device=keys.device)
    x = _mix64(keys + (step + 1) * _GOLDEN)
    return (_srl(x, 40).float() + 0.5) * 2.0**-24


def sample_next(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None = None,
                u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token [B], behaviour logprob [B] under softmax(logits / T), before top-k/top-p).
    Temperature 0 is greedy (log-probs then at T=1, as vLLM reports them). With `u` (U(0,1) [B]) the draw is the
    inverse CDF of the filtered softmax at u: one random number per row instead of Gumbel noise over the whole
    vocabulary; without it torch.multinomial draws from `generator`."""
    if sampling.temperature <= 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    scaled = logits.float() / sampling.temperature
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]
    keep = None  # [B, V] bool, the top-k / top-p set; None: every token
    if sampling.top_k is not None and 0 < sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        keep = scaled >= kth
    if sampling.top_p < 1.0:
        filt = scaled if keep is None else scaled.masked_fill(~keep, float("-inf"))
        sorted_logits, order = torch.sort(filt, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        keep = torch.ones_like(scaled, dtype=torch.bool).scatter(-1, order, ~drop & (sorted_logits > float("-inf")))
    probs = logp.exp() if keep is None else logp.exp().masked_fill(~keep, 0.0)  # unnormalised is fine below
    if u is None:
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
    else:
        cdf = probs.cumsum(-1)  # [B, V]; CPU cumsum accumulates in double
        total = cdf[:, -1:].contiguous()  # [B, 1]
        # first token whose cdf exceeds u * total (a positive-probability token); the min guards the rounding of
        # u * total up to total, by the last token that raised the cdf
        tok = torch.minimum(torch.searchsorted(cdf, u[:, None] * total, right=True),
                            torch.searchsorted(cdf, total)).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class BufferLayer(DynamicLayer):
    """transformers cache layer that writes keys/values into a preallocated [B, H, capacity, D] buffer (doubling
    when full) and returns views, instead of DynamicLayer's O(T) torch.cat on every decoding step."""

    def __init__(self, capacity: int = 256, rows: torch.Tensor | None = None):
        super().__init__()
        self.capacity, self.rows, self.length = capacity, rows, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:  # prefill: store row r as prompt rows[r] (the group's n copies), no extra copy
            self.lazy_initialization(key_states, value_states)
            B, H, S, D = key_states.shape
            rows = self.rows if self.rows is not None else torch.arange(B, device=key_states.device)
            self.kbuf = key_states.new_empty(len(rows), H, max(self.capacity, S), D)
            self.vbuf = value_states.new_empty(len(rows), H, max(self.capacity, S), value_states.shape[-1])
            self.kbuf[:, :, :S] = key_states[rows]
            self.vbuf[:, :, :S] = value_states[rows]
            self.length = S
            self.keys, self.values = self.kbuf[:, :, :S], self.vbuf[:, :, :S]
            return key_states, value_states
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[-2]:
            grow = max(end, 2 * self.kbuf.shape[-2]) - self.kbuf.shape[-2]
            self.kbuf = torch.cat([self.kbuf, self.kbuf.new_empty(*self.kbuf.shape[:2], grow, self.kbuf.shape[-1])], 2)
            self.vbuf = torch.cat([self.vbuf, self.vbuf.new_empty(*self.vbuf.shape[:2], grow, self.vbuf.shape[-1])], 2)
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
            self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.kbuf.shape[0], device=self.kbuf.device).repeat_interleave(repeats))


def _make_cache(model, capacity: int, rows: torch.Tensor):
    """A buffered cache for transformers models with full attention in every layer; None lets the model build its
    own (sliding-window/hybrid models, r1kit's MLA model with its latent cache)."""
    if not type(model).__module__.startswith("transformers."):
        return None
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return None
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: BufferLayer(capacity, rows)
    return cache


class NativeWorker:
    """RolloutWorker over a live transformers-style causal LM; `update_weights` is a no-op because the
    sampler and the trainer share the same parameters, unless `dtype` gives the sampler a copy of its own."""

    def __init__(self, model, tokenizer, max_batch_size: int = 256, truncate: str = "error",
                 record_routing: bool = False, dtype: torch.dtype | None = None, plain_decode: bool = True):
        self.own = dtype is not None and dtype != next(model.parameters()).dtype  # a copy, synced by update_weights
        if self.own:
            model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.model, self.tokenizer, self.max_batch_size, self.truncate = model, tokenizer, max_batch_size, truncate
        self.plain_decode = plain_decode  # False: transformers' forward on every step (grpo/rollout/decode.py)
        # routing replay: keep the experts r1kit's MoE model routed every prompt and sampled token to
        self.routed = getattr(model, "routed_layers", list)() if record_routing else None
        if record_routing and not self.routed:
            raise ValueError("routing replay needs r1kit's DeepSeek MoE model (a model with routed MoE layers)")
        self.eos_ids = set(_eos_ids(model, tokenizer))
        cfg = getattr(model, "config", None)
        self.max_model_len = getattr(cfg, "max_position_embeddings", None) or 10**9

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module = ()) -> None:
        """Nothing to copy when generation reads the policy's own parameters; with a copy of its own, the policy's
        parameters and persistent buffers (a module, or (name, tensor) pairs) are cast into it."""
        if not self.own:
            return
        named = named_tensors.state_dict().items() if isinstance(named_tensors, torch.nn.Module) else named_tensors
        mine = self.model.state_dict()
        for name, t in named:
            mine[name].copy_(t)

    def sleep(self) -> None:
        """No separate memory to free."""

    def wake(self) -> None:
        """No separate memory to restore."""

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # runtime.compile'd layers: decoding stays eager (no recompiles)
    def score(self, sequences: list[list[int]], starts: list[int], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log_softmax(logits / T) of seq[j] for j >= start, one right-padded forward per call."""
        device = next(self.model.parameters()).device
        L = max(map(len, sequences))
        ids = torch.zeros((len(sequences), L), dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s, device=device), 1
        was_training = self.model.training
        self.model.eval()
        try:
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=attn).logits.float() / temperature, -1)
        finally:
            self.model.train(was_training)
        return [[logp[i, j - 1, s[j]].item() for j in range(max(start, 1), len(s))]
                for i, (s, start) in enumerate(zip(sequences, starts))]

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # runtime.compile'd layers: decoding stays eager (no recompiles)
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """len(prompt_ids) * n completions, prompt-major; prompts run in length buckets of <= max_batch_size rows."""
        prompts = [fit_prompt(p, sampling.max_tokens, self.max_model_len, self.truncate) for p in prompt_ids]
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_chunk = max(1, self.max_batch_size // n)
        was_training = self.model.training
        self.model.eval()
        cfg = getattr(self.model, "config", None)
        attn_impl = getattr(cfg, "_attn_implementation", None)
        swap = attn_impl in ("sdpa", "r1kit_sdpa")  # decoding steps skip repeat_kv (restored below for training)
        # one-token steps as plain tensor calls (grpo/rollout/decode.py) where they apply; on CPU only, where the
        # overhead was measured: its fused weights are one copy of the layers, taken here for this call's chunks
        plain = PlainDecoder(self.model) if swap and self.plain_decode and PlainDecoder.supports(self.model) \
            and next(self.model.parameters()).device.type == "cpu" else None
        if swap:
            cfg._attn_implementation = "r1kit_decode"
        out: list[Completion | None] = [None] * (len(prompts) * n)
        try:
            for start in range(0, len(order), per_chunk):
                idx = order[start:start + per_chunk]
                seeds = torch.tensor([request_seed(base, (sampling.first_index + i) * n + j) for i in idx
                                      for j in range(n)])
                comps = self._generate_chunk([prompts[i] for i in idx], n, sampling, seeds, plain)
                for k, c in enumerate(comps):
                    c.prompt_index = idx[k // n]
                    out[c.prompt_index * n + k % n] = c
            return out  # type: ignore[return-value]
        finally:
            self.model.train(was_training)
            if swap:
                cfg._attn_implementation = attn_impl

    def _generate_chunk(self, prompts, n, sampling, seeds, plain: PlainDecoder | None) -> list[Completion]:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        P, L, T = len(prompts), max(len(p) for p in prompts), sampling.max_tokens
        ids = torch.full((P, L), pad, dtype=torch.long, device=device)
        attn = torch.zeros((P, L), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p):] = torch.tensor(p, device=device)
            attn[i, L - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        B = P * n
        rep = torch.arange(P, device=device).repeat_interleave(n)  # batch row -> prompt
        cache = _make_cache(self.model, L + T, rep)  # buffered layers expand to the n copies while prefilling
        # a ready 4D additive mask where the attention takes one (sdpa -> r1kit_decode, eager); flash-attention
        # backends want the 2D padding mask
        mask4d = cache is not None and getattr(self.model.config, "_attn_implementation", None) in ("r1kit_decode",
                                                                                                     "eager")
        plain = plain if cache is not None else None  # it reads and writes the buffered cache
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        if cache is None:
            cache = out.past_key_values
            if n > 1:
                cache.batch_select_indices(rep)
        if self.routed:  # prompt tokens' experts [P, L, M, K]; sampled tokens' experts [B, T, M, K] (-1: not fed)
            K = self.routed[0].cfg.num_experts_per_tok
            pre = self._routing().view(P, L, len(self.routed), K)
            routes = torch.full((B, T, len(self.routed), K), -1, dtype=torch.int16, device=device)
        logits = out.logits[:, -1][rep]  # [B, V]
        attn, next_pos = attn[rep], pos[rep, -1:] + 1  # [B, L], [B, 1]
        if mask4d:  # [B, 1, 1, L+T], -inf on left padding, sliced each step: transformers passes a 4D mask
            # through as it is instead of building one every step
            # fp32 on CPU (the C attention adds it to fp32 scores), else the weights' dtype
            dt = torch.float32 if device.type == "cpu" else next(self.model.parameters()).dtype
            bias = torch.zeros((B, 1, 1, L + T), dtype=dt, device=device)
            attn = bias.masked_fill_(F.pad(attn == 0, (0, T))[:, None, None], float("-inf"))
        keys = seeds.to(device)  # one SplitMix64 stream per request, drawn DRAWS steps at a time ([B, DRAWS] per pass
        # instead of ~15 small integer ops every step)
        rows = torch.arange(B, device=device)  # batch row -> request
        live = torch.ones(B, dtype=torch.bool, device=device)  # per batch row: still generating
        toks = torch.full((B, T), pad, dtype=torch.long, device=device)
        lps = torch.zeros((B, T), device=device)
        length = torch.full((B,), T, dtype=torch.long, device=device)
        reason = ["length"] * B
        eos = torch.tensor(sorted(self.eos_ids) or [-1], device=device)
        stops, tail = sampling.stop or [], max((len(s) for s in sampling.stop or []), default=0) + 2
        for step in range(T):
            if step % DRAWS == 0:
                draws = uniform(keys, torch.arange(step, min(step + DRAWS, T), device=device))
            tok, lp = sample_next(logits, sampling, u=draws[rows, step % DRAWS])
            toks[rows, step], lps[rows, step] = tok, lp
            done = torch.isin(tok, eos) & live
            if stops:
                for j in live.nonzero().flatten().tolist():
                    if not done[j]:
                        text = self.tokenizer.decode(toks[rows[j], max(0, step + 1 - tail):step + 1].tolist(),
                                                     skip_special_tokens=True)
                        done[j] = any(s in text for s in stops)
            for j in done.nonzero().flatten().tolist():
                length[rows[j]], reason[int(rows[j])] = step + 1, "stop"
            live &= ~done
            n_live = int(live.sum())
            if n_live == 0 or step == T - 1:
                break
            if n_live <= 0.75 * len(rows):  # compact: finished rows stop costing compute
                keep = live.nonzero().flatten()
                cache.batch_select_indices(keep)
                rows, attn, next_pos, tok, live = rows[keep], attn[keep], next_pos[keep], tok[keep], live[keep]
            if not mask4d:
                attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1)
            mask = attn[..., :L + step + 1] if mask4d else attn
            if plain is not None:
                logits = plain.step(tok, next_pos, cache, mask)
            else:
                out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                                 past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
            if self.routed:  # the forward just fed token `step` of each live row
                routes[rows, step] = self._routing().view(len(rows), *routes.shape[2:])
        toks_l, lps_l, len_l = toks.tolist(), lps.tolist(), length.tolist()
        comps = [Completion(prompt_index=r // n, token_ids=toks_l[r][:len_l[r]],
                            text=_text(self.tokenizer, toks_l[r][:len_l[r]], stops), logprobs=lps_l[r][:len_l[r]],
                            finish_reason=reason[r]) for r in range(B)]
        if self.routed:
            for r, c in enumerate(comps):
                p = r // n
                c.routed_experts = torch.cat([pre[p, L - len(prompts[p]):], routes[r, :len_l[r]]]).cpu()
        return comps

    def _routing(self) -> torch.Tensor:
        """The experts the last forward routed each of its tokens to, [tokens, M, K] int16."""
        return torch.stack([m.last_topk_ids for m in self.routed], 1).to(torch.int16)


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
