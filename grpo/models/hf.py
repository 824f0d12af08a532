"""Hugging Face causal LMs: build a fresh model from a config dict, or load a checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

_DEEPSEEK_TYPES = ("deepseek_v3", "deepseek_v2")
# up to this many keys, bf16 attention on CPU runs as plain bmm + fp32 softmax (see sdpa_or_bmm)
SHORT_BF16_KEYS = 256


def sdpa_or_bmm(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa (what r1kit loads HF models with, as "r1kit_sdpa"), except for bf16 on CPU over at most
    SHORT_BF16_KEYS keys: there torch's CPU flash attention took 2x the time of two bmms around an fp32 softmax
    (forward + backward, 142 keys, docs/runtime.md), and from 512 keys on it is the faster one.
    query [B, H, S, D], key/value [B, Hkv, T, D] -> ([B, S, H, Dv], None)."""
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    B, H, S, D = query.shape
    T, Hkv = key.shape[-2], key.shape[1]
    if dev != "cpu" or dtype != torch.bfloat16 or T > SHORT_BF16_KEYS or dropout \
            or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "sliding_window", "softcap")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    # transformers' sdpa: causal only without a mask and over several queries, then aligned upper-left (keys past
    # the queries' count dropped)
    causal = attention_mask is None and S > 1 and (is_causal if is_causal is not None
                                                    else getattr(module, "is_causal", True))
    if causal:
        k, v, T = k[:, :, :S], v[:, :, :S], S
    if Hkv != H:  # grouped-query: each KV head serves H // Hkv query heads (repeat_kv's order)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)).float().mul_(D**-0.5 if scaling is None else scaling)  # [B, H, S, T] fp32
    if attention_mask is None and not causal:
        return (torch.softmax(scores, dim=-1).to(dtype) @ v).transpose(1, 2).contiguous(), None
    if causal:
        attention_mask = torch.ones(S, S, dtype=torch.bool, device=query.device).tril()
    mask = attention_mask[..., :T]  # bool (True: attend) or additive
    allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
    if mask.dtype != torch.bool:
        scores = scores.add_(mask)
    # a query with no key to attend (a left-padding position) gets 0, as from torch's sdpa, not NaN
    scores = scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    out = probs.to(dtype) @ v  # [B, H, S, Dv]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("r1kit_sdpa", sdpa_or_bmm)
ALL_MASK_ATTENTION_FUNCTIONS.register("r1kit_sdpa", sdpa_mask)


def build_from_config(init: dict, vocab_size: int, pad_token_id: int | None, eos_token_id: int | None, seed: int = 0):
    """A randomly initialised causal LM: `{preset: tiny, ...overrides}` builds r1kit's DeepSeek model from a
    preset, `model_type: deepseek_v3` r1kit's DeepSeek model from those fields, any other `model_type` the
    transformers model of that type."""
    fields = dict(init)
    if "preset" in fields or fields.get("model_type") in _DEEPSEEK_TYPES:
        from grpo.models import PRESETS, DeepseekConfig, DeepseekForCausalLM

        preset = fields.pop("preset", None)
        fields.pop("model_type", None)
        fields.update(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"init.preset: unknown preset {preset!r} (have: {', '.join(PRESETS)})")
        cfg = PRESETS[preset](**fields) if preset else DeepseekConfig.from_dict(fields)
        torch.manual_seed(seed)
        return DeepseekForCausalLM(cfg)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("init needs a model_type (e.g. qwen2)")
    fields.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(model_type, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer exactly as saved. AutoTokenizer swaps in the model type's own tokenizer
    class for some types (qwen2, deepseek_v3: MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in transformers 5),
    which rebuilds the pre-tokenizer and would silently re-tokenize a locally trained BPE differently."""
    cfg_file = Path(path) / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an HF directory; training runs in fp32 on CPU unless told otherwise."""
    tok = load_tokenizer(path)
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type in _DEEPSEEK_TYPES:  # r1kit's own MoE/MLA code: trains, fast MoE kernels, MTP, bias update
        from grpo.models import DeepseekForCausalLM

        model = DeepseekForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if model.config._attn_implementation == "sdpa":
            model.set_attn_implementation("r1kit_sdpa")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
