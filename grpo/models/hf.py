"""Hugging Face causal LMs: build a fresh model from a config dict, or load a checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast


def build_from_config(init: dict, vocab_size: int, pad_token_id: int | None, eos_token_id: int | None, seed: int = 0):
    """A randomly initialised causal LM from a transformers config dict (`model_type` plus its fields)."""
    fields = dict(init)
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
