"""Shared test fixtures: a tiny Qwen2 and a locally trained tokenizer, saved as an HF directory (no hub)."""

from __future__ import annotations

import threading
from pathlib import Path

from grpo.data.synthetic import arithmetic_rows
from grpo.data.tokenizer import train_bpe
from grpo.models import hf
from grpo.sft import join
from grpo.templates import render


def tiny_checkpoint(path: Path, hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = True) -> Path:
    """A randomly initialised tiny Llama (head_dim 32) plus a BPE tokenizer fitted to the arithmetic task."""
    rows = arithmetic_rows("train", 400, tagged_fraction=0.5)
    texts = []
    for r in rows:
        p = render("r1_zero", r["prompt"])
        texts += [p, join(p, r["solution"])]
    tok = train_bpe(texts, 512)
    init = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 32, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256,
            "tie_word_embeddings": tie}
    model = hf.build_from_config(init, len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def length_reward(completions, **kwargs):
    """A reward with spread on an untrained model (so GRPO has a signal): prefer ~20-character completions."""
    return [-abs(20 - len(c)) / 20 for c in completions]


REF_STARTED = threading.Event()  # set by a test's forward hook when the frozen KL reference runs a forward
REWARD_CALLS: list[tuple[str, bool]] = []


def waits_for_reference_pass(completions, **kwargs):
    """A reward that returns once the KL reference has started a forward in this step (REF_STARTED), recording the
    thread it ran on and whether that happened; scored before the reference pass (no overlap) it would time out."""
    REWARD_CALLS.append((threading.current_thread().name, REF_STARTED.wait(timeout=30)))
    REF_STARTED.clear()
    return [float(len(c)) for c in completions]
