"""SFT stage: next-token loss on templated prompt + completion text (pretraining, cold start, distillation data).

Simplifications: rows are sampled with replacement each step (no packing yet); the loss is on completion
tokens only unless `loss_on: all`. Prompt and completion are tokenized separately and joined, so the model
learns exactly the token boundary it will see when it samples after the prompt.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from grpo import checkpoint
from grpo.config import OptimFields, SFTConfig, TokenizerConfig
from grpo.data import load_rows
from grpo.data.tokenizer import train_bpe
from grpo.logprobs import final_hidden, fusable
from grpo.models import DeepseekForCausalLM, hf
from grpo.models.deepseek import causal_lm_loss
from grpo.templates import render


def join(prompt_text: str, completion: str) -> str:
    """Completion text as appended to the prompt: one space between them unless either side has one."""
    return completion if (not prompt_text or prompt_text[-1].isspace() or completion[:1].isspace()) else " " + completion


def make_optimizer(model, cfg: OptimFields, total_steps: int):
    """AdamW plus a warmup + constant/cosine/linear schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.lr_schedule]

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def progress(console: Console) -> Progress:
    """The progress bar every loop shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)


def encode_rows(rows: list[dict], tokenizer, template: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per row, completions cut to fit max_length."""
    prompts = [render(template, r["prompt"], tokenizer) for r in rows]
    completions = [join(p, r["completion"]) for p, r in zip(prompts, rows)]
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    c_ids = tokenizer(completions, add_special_tokens=False).input_ids
    out = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        c = c + [tokenizer.eos_token_id]
        if len(p) >= max_length:
            raise ValueError(f"row {i}: prompt is {len(p)} tokens, longer than max_length={max_length}")
        out.append((p, c[: max_length - len(p)]))
    return out


def collate(pairs, pad_id: int, loss_on: str) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels [B, L]; labels are -100 on padding (and prompt)."""
    L = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(pairs), L), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        seq = torch.tensor(p + c)
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        start = 0 if loss_on == "all" else len(p)
        labels[i, start: len(seq)] = seq[start:]
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens. From the final hidden states through fused_logprob
    (no [B, L, V] logits) where the head allows; r1kit's DeepSeek model computes it itself (fused inside, plus the
    lambda-weighted MTP loss and any balance loss), and other heads keep the model's own `labels` loss."""
    if isinstance(model, DeepseekForCausalLM):  # its loss never forms [B, L, V] logits unless asked for them
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     return_logits=False).loss
    if not fusable(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)  # right padding: the defaults
    h = final_hidden(model, ids, batch["attention_mask"], positions)  # [B, L, D]
    return causal_lm_loss(h, model.get_output_embeddings().weight, batch["labels"])


def train(cfg: SFTConfig, model_path: str | None, out_dir: Path, console: Console | None = None) -> Path:
    """Run the SFT stage; returns the final checkpoint directory (out_dir/final)."""
    console = console or Console()
    torch.manual_seed(cfg.seed)
    data_cfg = cfg.data.model_copy(update={"completion_column": cfg.data.completion_column or "solution"})
    rows = load_rows(data_cfg, require_answer=False)
    if cfg.init is not None:
        texts = []
        for r in rows:
            p = render(cfg.template, r["prompt"])
            texts += [p, join(p, r["completion"])]
        tokenizer = train_bpe(texts, (cfg.train_tokenizer or TokenizerConfig()).vocab_size)
        model = hf.build_from_config(cfg.init, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.seed)
        console.print(f"[sft] built {cfg.init.get('model_type')} from config: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tokenizer)}")
    else:
        if model_path is None:
            raise ValueError("sft needs `model` (an HF directory) or `init` (a config to build from)")
        model, tokenizer = hf.load(model_path)
    pairs = encode_rows(rows, tokenizer, cfg.template, cfg.max_length)
    opt, sched = make_optimizer(model, cfg, cfg.steps)
    rng = random.Random(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    with open(out_dir / "metrics.jsonl", "w") as log, progress(console) as bar:
        task = bar.add_task("sft", total=cfg.steps, info="")
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            batch = collate([pairs[rng.randrange(len(pairs))] for _ in range(cfg.batch_size)], tokenizer.pad_token_id, cfg.loss_on)
            loss = lm_loss(model, batch)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(model, "update_expert_bias"):  # DeepSeek-V3 aux-loss-free balancing, after each step
                model.update_expert_bias()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"sft step {step}: loss is {loss.item()}")
            m = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "learning_rate": sched.get_last_lr()[0],
                 "tokens": int(batch["attention_mask"].sum()), "step_time": time.perf_counter() - t0}
            log.write(json.dumps(m) + "\n")
            bar.update(task, advance=1, info=f"loss {m['loss']:.3f}")
    return checkpoint.save(out_dir / "final", model, tokenizer)

