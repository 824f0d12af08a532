"""The native sampler's decoding step: the attention it registers with transformers (r1kit_decode), and a
plain-tensor step for Llama-family models that replaces transformers' forward on one-token steps.

Why a plain step: at a tiny model's decoding shapes (64 rows, hidden 256) transformers' forward spends more time
on module calls, mask and cache bookkeeping and three separate q/k/v (and two gate/up) GEMMs than on the maths.
PlainDecoder runs the same operations, in the same order and dtypes as transformers' Llama/Qwen2 code (RMSNorm in
fp32 statistics, the model's own rotary module, SwiGLU), over fused q/k/v and gate/up weights, reading and writing
the sampler's buffered cache directly. Prefill still runs transformers' forward. Other architectures keep
transformers' forward on every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from grpo.kernels import cpu_attention
from grpo.models.hf import sdpa_or_bmm


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """r1kit's sdpa (grpo.models.hf.sdpa_or_bmm), except on a plain one-token decoding step: the query heads that
    share a KV head become that KV head's query rows, so grouped-query models attend to the buffered (strided)
    cache without repeat_kv copying it every layer and step. query [B,H,1,D], key/value [B,Hkv,T,D] -> [B,1,H,D]."""
    B, H, S, D = query.shape
    if S != 1 or dropout or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "sliding_window")):
        return sdpa_or_bmm(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           is_causal=is_causal, **kwargs)
    Hkv = key.shape[1]
    q = query.reshape(B, Hkv, H // Hkv, D)  # heads g*rep .. g*rep+rep-1 read KV head g (repeat_kv's order)
    # on CPU one C pass over the fp32 or bf16 cache with an fp32 query (grpo/kernels/cpu_attention.py), else sdpa
    out = None if q.device.type != "cpu" else \
        cpu_attention.decode(q.float(), key, value, attention_mask, D**-0.5 if scaling is None else scaling)
    if out is None:
        mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool \
            else attention_mask.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.to(query.dtype).reshape(B, H, 1, value.shape[-1]).transpose(1, 2), None


AttentionInterface.register("r1kit_decode", decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("r1kit_decode", sdpa_mask)

SUPPORTED = ("llama", "qwen2")  # transformers model types whose decoder layer PlainDecoder reproduces


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen2 RMSNorm, op for op: fp32 statistics, cast back, then the weight. In fp32 torch's
    rms_norm is those ops in that order, bit for bit, in one call; in bf16 it rounds elsewhere, so bf16 keeps them."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _mm(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, in] @ w_t [in, out] (+ bias [out]): nn.Linear with its weight stored transposed."""
    return x @ w_t if bias is None else torch.addmm(bias, x, w_t)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (transformers' apply_rotary_pos_emb, for one of q or k)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class PlainDecoder:
    """One-token decoding steps of a Llama/Qwen2 transformers model as plain tensor calls (see the module note).
    The fused weights are copies, taken at construction: build one per generate call, after the last update."""

    def __init__(self, model):
        base, cfg = model.model, model.config
        self.embed, self.rotary, self.head = base.embed_tokens, base.rotary_emb, model.lm_head.weight
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        attn = base.layers[0].self_attn
        self.H, self.Hkv, self.D, self.scale = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, \
            attn.scaling
        self.layers = []
        with torch.no_grad():
            for layer in base.layers:
                a, m = layer.self_attn, layer.mlp
                qkv = [a.q_proj, a.k_proj, a.v_proj]
                bias = torch.cat([p.bias for p in qkv]) if a.q_proj.bias is not None else None
                # weights transposed ([in, out], contiguous): oneDNN's bf16 GEMM at 64 rows took ~15% longer on
                # nn.Linear's [out, in] layout
                self.layers.append({
                    "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                    "ln2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                    "qkv": torch.cat([p.weight for p in qkv]).t().contiguous(), "qkv_bias": bias,  # [hidden, (H+2Hkv)D]
                    "o": a.o_proj.weight.t().contiguous(), "o_bias": a.o_proj.bias,
                    "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),  # [hidden, 2 I]
                    "down": m.down_proj.weight.t().contiguous(), "down_bias": m.down_proj.bias})
            self.head = self.head.t().contiguous()  # [hidden, V]

    @staticmethod
    def supports(model) -> bool:
        """A transformers Llama/Qwen2 causal LM with SwiGLU, full attention (no sliding window), no q/k norms or
        projection biases in the MLP, and a plain bias-free head (no logit transforms)."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED or not hasattr(model, "model") \
                or not type(model).__module__.startswith("transformers."):
            return False
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "use_sliding_window", False) \
                or getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "mlp_bias", False):
            return False
        head = model.lm_head
        return type(head) is torch.nn.Linear and head.bias is None and not hasattr(model.model.layers[0].self_attn,
                                                                                  "q_norm")

    def step(self, tok: torch.Tensor, pos: torch.Tensor, cache, mask: torch.Tensor) -> torch.Tensor:
        """tok [B], pos [B, 1], cache: the sampler's buffered cache (one BufferLayer per layer), mask [B, 1, 1, T]
        additive -> logits [B, V] of the next token; writes this step's keys and values into the cache."""
        B, H, Hkv, D = tok.shape[0], self.H, self.Hkv, self.D
        h = self.embed(tok)  # [B, hidden]
        cos, sin = self.rotary(h[:, None], pos)  # [B, 1, D] each
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]: over heads
        for i, w in enumerate(self.layers):
            x = _rms(h, *w["ln1"])
            qk, v = _mm(x, w["qkv"], w["qkv_bias"]).split([(H + Hkv) * D, Hkv * D], dim=-1)
            q, k = _rotary(qk.view(B, H + Hkv, 1, D), cos, sin).split([H, Hkv], dim=1)  # q and k heads at once
            keys, values = cache.layers[i].update(k, v.view(B, Hkv, 1, D))
            out = decode_attention(None, q, keys, values, mask, scaling=self.scale)[0]  # [B, 1, H, D]
            h = h + _mm(out.reshape(B, H * D), w["o"], w["o_bias"])
            gate, up = _mm(_rms(h, *w["ln2"]), w["gate_up"]).chunk(2, dim=-1)
            h = h + _mm(F.silu(gate) * up, w["down"], w["down_bias"])
        return _mm(_rms(h, *self.norm), self.head)
