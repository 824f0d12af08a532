"""SFT stage: next-token loss on templated prompt + completion text (pretraining, cold start, distillation data).

With `epochs`, the data is a stream of epochs, each a fresh seeded shuffle of the examples (no replacement); with
`steps`, each step draws its rows with replacement from one seeded stream (r1kit's SFT as it was: the built-in
recipe's pretraining depends on it; a resumed run fast-forwards the stream). With `packing`, a step's examples are packed first-fit into rows of at most
`max_length` tokens whose positions restart at 0 per example and whose attention never crosses examples, so the
loss (mean over all labelled tokens of the step) equals the unpacked one; only the padding shrinks.

Data parallel under torchrun (runtime.distributed: DDP, FSDP2 or DeepSpeed ZeRO): `batch_size` stays the global
batch, each rank takes its contiguous share of each step's examples, and each rank's loss is weighted by its share
of the step's labelled tokens (all-reduced), so the update is the one-process token mean over the global batch;
rank 0 logs and saves. Simplifications: `batch_size` counts examples per step, packed or not, so the tokens
per step vary; examples longer than `max_length` are cut, never split across rows; the DeepSeek model's
sequence-wise balance loss (aux_loss_alpha > 0) treats a packed row as one sequence. The loss is on completion
tokens only unless `loss_on: all`. Prompt and completion are tokenized separately and joined, so the model
learns exactly the token boundary it will see when it samples after the prompt.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import random
import time
from functools import lru_cache
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from grpo import checkpoint
from grpo.accel import (active_params, all_sum, autocast, backward, barrier, check_replicas, compile_layers, describe,
                        distributed, is_deepspeed, load_trainable, make_optimizer, open_metrics, optimizer_step,
                        prepare_trainable, progress, seed_everything, stage_device, to_device)
from grpo.config import ConfigError, SFTConfig, TokenizerConfig
from grpo.data import DataError, load_rows
from grpo.data.tokenizer import train_bpe
from grpo.kernels.logprob import fused_logprob
from grpo.logprobs import final_hidden, fusable, unwrap
from grpo.models import DeepseekForCausalLM, hf
from grpo.models.deepseek import causal_lm_loss
from grpo.templates import render


def join(prompt_text: str, completion: str) -> str:
    """Completion text as appended to the prompt: one space between them unless either side has one."""
    return completion if (not prompt_text or prompt_text[-1].isspace() or completion[:1].isspace()) else " " + completion


def chat_reply(tokenizer, prompt, prompt_text: str, completion: str, where: str) -> str:
    """The assistant turn as the chat template writes it after `prompt_text` (closing tokens included): the
    whole conversation rendered, minus the prompt's rendering, which must be its prefix."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(f"{where}: the chat template's conversation does not start with its generation prompt")
    return full[len(prompt_text):]


def encode_rows(rows: list[dict], tokenizer, template: str, max_length: int, name: str = "data") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per row, completions cut to fit max_length. Under `chat` the completion
    is the template's assistant turn, and EOS is added only if that turn does not already hold it."""
    prompts = [render(template, r["prompt"], tokenizer) for r in rows]
    if template == "chat":
        completions = [chat_reply(tokenizer, r["prompt"], p, r["completion"], f"{name}: row {i}")
                       for i, (p, r) in enumerate(zip(prompts, rows))]
    else:
        completions = [join(p, r["completion"]) for p, r in zip(prompts, rows)]
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    c_ids = tokenizer(completions, add_special_tokens=False).input_ids
    out = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        if template != "chat" or tokenizer.eos_token_id not in c:
            c = c + [tokenizer.eos_token_id]
        if len(p) >= max_length:
            raise DataError(f"{name}: row {i}: prompt is {len(p)} tokens, longer than max_length={max_length}")
        out.append((p, c[: max_length - len(p)]))
    return out


# ---------------------------------------------------------------- batches: padded or packed


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


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Groups of indices whose lengths sum to at most max_length, with the fewest row x longest-row tokens: for
    each row count R, from one example per row (plain padding) down to the fewest rows that could hold them all,
    longest example first into the emptiest row (LPT); first-fit decreasing if no R fits that way."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, best_size = None, None
    for R in range(len(lengths), max(1, -(-sum(lengths) // max_length)) - 1, -1):
        rows = [(0, r) for r in range(R)]  # heap of (fill, row)
        groups: list[list[int]] = [[] for _ in range(R)]
        for i in order:
            fill, r = heapq.heappop(rows)
            groups[r].append(i)
            heapq.heappush(rows, (fill + lengths[i], r))
        width = max(f for f, _ in rows)
        if width <= max_length and (best_size is None or R * width < best_size):
            best, best_size = groups, R * width
    if best is not None:
        return best
    groups, free = [], []
    for i in order:
        j = next((j for j, f in enumerate(free) if f >= lengths[i]), None)
        if j is None:
            groups.append([i])
            free.append(max_length - lengths[i])
        else:
            groups[j].append(i)
            free[j] -= lengths[i]
    return groups


def collate_packed(pairs, pad_id: int, loss_on: str, max_length: int) -> dict[str, torch.Tensor]:
    """Packed rows input_ids/position_ids/labels [R, L] and no attention_mask: positions restart at 0 for each
    example (transformers and r1kit's DeepSeek model then keep attention inside each example), the padding tail
    is one more unlabelled example, and an example's first token is never a target (nothing of it precedes it)."""
    groups = pack([len(p) + len(c) for p, c in pairs], max_length)
    L = max(sum(len(pairs[i][0]) + len(pairs[i][1]) for i in g) for g in groups)
    ids = torch.full((len(groups), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(groups), L), dtype=torch.long)
    labels = torch.full((len(groups), L), -100, dtype=torch.long)
    for r, g in enumerate(groups):
        at = 0
        for i in g:
            p, c = pairs[i]
            seq = torch.tensor(p + c)
            n = len(seq)
            ids[r, at: at + n] = seq
            pos[r, at: at + n] = torch.arange(n)
            start = max(1, 0 if loss_on == "all" else len(p))
            labels[r, at + start: at + n] = seq[start:]
            at += n
        pos[r, at:] = torch.arange(L - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def make_batch(pairs, pad_id: int, cfg: SFTConfig) -> dict[str, torch.Tensor]:
    """The step's batch, packed or padded, with its real and padding token counts (ints)."""
    batch = (collate_packed(pairs, pad_id, cfg.loss_on, cfg.max_length) if cfg.packing
             else collate(pairs, pad_id, cfg.loss_on))
    tokens = sum(len(p) + len(c) for p, c in pairs)
    return {**batch, "tokens": tokens, "padded_tokens": batch["input_ids"].numel() - tokens}


# ---------------------------------------------------------------- losses


def _positions(batch: dict) -> torch.Tensor:
    """The batch's position_ids, or 0..L-1 per row (right padding: the defaults)."""
    if "position_ids" in batch:
        return batch["position_ids"]
    ids = batch["input_ids"]
    return torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens. From the final hidden states through fused_logprob
    (no [B, L, V] logits) where the head allows; r1kit's DeepSeek model computes it itself (fused inside, plus the
    lambda-weighted MTP loss and any balance loss), and other heads keep the model's own `labels` loss."""
    model = unwrap(model)  # a peft model: the wrapped model, its LoRA layers inside
    ids, attn, pos = batch["input_ids"], batch.get("attention_mask"), _positions(batch)
    if isinstance(model, DeepseekForCausalLM):  # its loss never forms [B, L, V] logits unless asked for them
        return model(input_ids=ids, attention_mask=attn, position_ids=pos, labels=batch["labels"],
                     return_logits=False).loss
    if not fusable(model):
        return model(input_ids=ids, attention_mask=attn, position_ids=pos, labels=batch["labels"]).loss
    h = final_hidden(model, ids, attn, pos)  # [B, L, D]
    return causal_lm_loss(h, model.get_output_embeddings().weight, batch["labels"])


@torch.no_grad()
def nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL as a float64 tensor, labelled-token count) of the main head only (no MTP or balance
    terms), without gradient."""
    model = unwrap(model)
    ids, attn, pos = batch["input_ids"], batch.get("attention_mask"), _positions(batch)
    targets = batch["labels"][:, 1:].flatten()  # [B*(L-1)]
    if fusable(model):
        h = final_hidden(model, ids, attn, pos)[:, :-1].flatten(0, 1)  # [B*(L-1), D]
        logp, _ = fused_logprob(h, model.get_output_embeddings().weight, targets)
        total = -logp.double().sum()
    else:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1].flatten(0, 1)
        total = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum").double()
    return total, int((targets >= 0).sum())


class LossModule(nn.Module):
    """The SFT losses as one module's forward, so that DDP / FSDP2 wrap all of it (lm_loss reads the head weight
    directly, which must happen inside the wrapped forward). forward(batch) -> lm_loss; nll=True -> nll_sum."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, nll: bool = False):
        return nll_sum(self.model, batch) if nll else lm_loss(self.model, batch)


def labelled(batch: dict) -> int:
    """Labelled next-token targets of a batch (what lm_loss averages over)."""
    return int((batch["labels"][:, 1:] >= 0).sum())


@torch.no_grad()
def eval_loss(model, pairs, pad_id: int, cfg: SFTConfig) -> float:
    """Mean next-token NLL over every labelled token of the held-out examples, in eval mode. `model`: the LM or its
    (wrapped) LossModule; every rank evaluates all of them (the wrapped forward has collectives)."""
    module = model if isinstance(model, (LossModule, nn.parallel.DistributedDataParallel)) or is_deepspeed(model) \
        else LossModule(model)
    module.eval()
    total, count = 0.0, 0
    for s in range(0, len(pairs), cfg.batch_size):
        batch = to_device(make_batch(pairs[s: s + cfg.batch_size], pad_id, cfg), stage_device(cfg.runtime))
        with autocast(cfg.runtime):
            t, n = module(batch, nll=True)
        total, count = total + t.item(), count + n
    module.train()
    return total / max(count, 1)


# ---------------------------------------------------------------- data order


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A seeded shuffle of range(n), a fresh one per epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_indices(step: int, n: int, batch_size: int, seed: int, limit: int | None = None) -> list[int]:
    """Example indices of `step`: the step-th batch_size slice of the epoch stream (every example once per
    epoch, in that epoch's order); the stream ends at `limit` examples (epochs * n) if given."""
    lo = step * batch_size
    hi = lo + batch_size if limit is None else min(lo + batch_size, limit)
    return [epoch_order(n, seed, i // n)[i % n] for i in range(lo, hi)]


def split_eval(rows: list[dict], cfg: SFTConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): `eval_data` loaded, or a seeded `eval_fraction` of `data` set apart."""
    if cfg.eval_data is not None:
        e = cfg.eval_data
        return rows, load_rows(e.model_copy(update={"completion_column": e.completion_column or "solution"}), require_answer=False)
    if cfg.eval_fraction == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    k = max(1, round(cfg.eval_fraction * len(rows)))
    if k >= len(rows):
        raise DataError(f"eval_fraction={cfg.eval_fraction} leaves no training rows of {len(rows)}")
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# ---------------------------------------------------------------- the loop


def train(cfg: SFTConfig, model_path: str | None, out_dir: Path, console: Console | None = None) -> Path:
    """Run the SFT stage; returns the final checkpoint directory (out_dir/final). With save_every, out_dir/last
    holds the newest checkpoint plus trainer_state, and a rerun continues from it exactly."""
    console = console or Console()
    seed_everything(cfg.seed)
    data_cfg = cfg.data.model_copy(update={"completion_column": cfg.data.completion_column or "solution"})
    rows, eval_rows = split_eval(load_rows(data_cfg, require_answer=False), cfg)
    last = out_dir / "last"
    resuming = cfg.resume and (last / "trainer_state").is_dir()
    rt = cfg.runtime
    if resuming and rt.lora is not None and model_path is None:
        raise ConfigError("sft: resuming a LoRA run needs `model`, the base the adapter was trained on")
    if resuming and rt.lora is not None:  # the base again, with the trained adapter from last/adapter
        model, tokenizer = load_trainable(model_path, rt, adapter=last / "adapter")
    elif resuming:  # exact resume: weights and tokenizer from last/, optimizer, schedule and RNG from its trainer_state
        model, tokenizer = load_trainable(str(last), rt)
    elif cfg.init is not None:
        if cfg.tokenizer is not None:  # a fresh model on a given tokenizer (say a teacher's, for distillation)
            tokenizer = hf.load_tokenizer(cfg.tokenizer)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        elif cfg.template == "chat":
            raise ConfigError("template: 'chat' needs a tokenizer with a chat_template; one trained for `init` has none")
        else:
            texts = []
            for r in rows:
                p = render(cfg.template, r["prompt"])
                texts += [p, join(p, r["completion"])]
            tokenizer = train_bpe(texts, (cfg.train_tokenizer or TokenizerConfig()).vocab_size)
        model = hf.build_from_config(cfg.init, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.seed)
        console.print(f"\\[sft] built {cfg.init.get('model_type') or cfg.init.get('preset')} from config: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tokenizer)}")
        model = prepare_trainable(model, rt)
    else:
        if model_path is None:
            raise ConfigError("sft needs `model` (an HF directory) or `init` (a config to build from)")
        model, tokenizer = load_trainable(model_path, rt)
    if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"template: 'chat' needs a tokenizer with a chat_template; {model_path or 'the trained tokenizer'} has none")
    pairs = encode_rows(rows, tokenizer, cfg.template, cfg.max_length, data_cfg.source)
    eval_pairs = encode_rows(eval_rows, tokenizer, cfg.template, cfg.max_length,
                             (cfg.eval_data or data_cfg).source) if eval_rows else []
    limit = cfg.epochs * len(pairs) if cfg.epochs else None
    total = cfg.steps or math.ceil(limit / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, total)
    start, spent = 0, {"flops": 0.0, "seconds": 0.0}  # training compute so far (compute/* metrics)
    if resuming:
        state = checkpoint.load_state(last, opt, sched)
        start, spent = state["step"], state.get("compute", spent)
        if int(os.environ.get("RANK", "0")) == 0:
            console.print(f"\\[sft] resumed from {last} at step {start}")
    compile_layers(model, rt)  # runtime.compile: in place, before DDP / FSDP2 wrap the loss module
    n_active = active_params(model)
    # the loss module goes to DDP / FSDP2 (its forward is the whole loss); `model` stays the plain LM for saving
    wrapped, opt, rank, world = distributed(LossModule(model), opt, rt, cfg.max_grad_norm)
    if resuming:  # FSDP2 / DeepSpeed: this rank's optimizer shard and RNG (a no-op otherwise)
        checkpoint.load_shard(last, opt, wrapped)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must divide evenly over {world} processes")
    main = rank == 0
    if world > 1 and main:
        console.print(f"\\[sft] {describe(wrapped, world)}")
    # `epochs`: shuffled passes, every example once per epoch. `steps`: rows drawn with replacement from one seeded
    # stream, as r1kit's SFT always has (the built-in recipe's pretraining is tuned to it), fast-forwarded on resume
    draw = random.Random(cfg.seed)
    if cfg.epochs is None:
        for _ in range(start * cfg.batch_size):
            draw.randrange(len(pairs))
    pad = tokenizer.pad_token_id
    device = stage_device(rt)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.train()
    with open_metrics(out_dir / "metrics.jsonl", start, main) as log, \
            progress(console) if main else contextlib.nullcontext() as bar:
        task = bar.add_task("sft", total=total, completed=start, info="") if main else None
        for step in range(start, total):
            t0 = time.perf_counter()
            idx = (batch_indices(step, len(pairs), cfg.batch_size, cfg.seed, limit) if cfg.epochs is not None
                   else [draw.randrange(len(pairs)) for _ in range(cfg.batch_size)])
            mine = idx[rank * len(idx) // world: (rank + 1) * len(idx) // world]  # this rank's share of the global batch
            if not mine:
                raise ValueError(f"sft step {step + 1}: {len(idx)} examples left cannot feed {world} processes")
            batch = make_batch([pairs[i] for i in mine], pad, cfg)
            # token mean over the GLOBAL batch: this rank's mean weighted by its token share, x world because the
            # DDP / FSDP2 gradient reduction averages over ranks
            n_mine = labelled(batch)
            n_all = all_sum(float(n_mine), world)
            with autocast(rt):
                loss = wrapped(to_device(batch, device))
            backward(wrapped, loss * (n_mine * world / n_all))
            grad_norm = optimizer_step(model, opt, sched, cfg.max_grad_norm, wrapped)
            loss_value = all_sum(loss.item() * n_mine, world) / n_all
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"sft step {step + 1}: loss is {loss_value}")
            m = {"step": step + 1, "epoch": (step * cfg.batch_size + len(idx)) / len(pairs), "loss": loss_value,
                 "grad_norm": grad_norm.item(), "learning_rate": sched.get_last_lr()[0], "examples": len(idx),
                 "tokens": int(all_sum(batch["tokens"], world)),
                 "padded_tokens": int(all_sum(batch["padded_tokens"], world)), "num_processes": world}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
                m["eval_loss"] = eval_loss(wrapped, eval_pairs, pad, cfg)
            m["step_time"] = time.perf_counter() - t0
            spent["flops"] += 6 * n_active * m["tokens"]  # forward + backward over the real tokens
            spent["seconds"] += m["step_time"]
            m["compute/flops"], m["compute/seconds"] = spent["flops"], spent["seconds"]
            log.write(json.dumps(m) + "\n")
            log.flush()
            if main:
                bar.update(task, advance=1, info=f"loss {m['loss']:.3f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                check_replicas(model, world, "SFT")
                checkpoint.save(last, model, tokenizer, {"step": step + 1, "cursor": (step + 1) * cfg.batch_size,
                                                        "compute": dict(spent)}, opt, sched, wrapped)  # every rank
    check_replicas(model, world, "SFT")
    final = checkpoint.save(out_dir / "final", model, tokenizer, wrapped=wrapped)  # every rank: FSDP2/ZeRO-3 gather
    barrier(world)  # no rank returns before the checkpoint is in place
    return final
