"""Hugging Face causal LMs: build a fresh model from a config dict, or load a checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast


_DEEPSEEK_TYPES = ("deepseek_v3", "deepseek_v2")


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
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
