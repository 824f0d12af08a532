"""Distillation stage: a student learns from a teacher that shares its tokenizer, in one of three modes.

- `kd` (token-level KD, Hinton et al.; TRL GKD with lambda = 0): on a dataset's prompt + completion text, the
  student's next-token distribution is pulled to the teacher's at every labelled position, by forward
  KL(p_teacher || p_student) (`loss: forward_kl`) or TRL's generalised JSD (`loss: jsd`, `jsd_beta`).
- `on_policy` (the student samples, the teacher scores each sampled token): `on_policy_loss: advantage` feeds the
  per-token -(log p_s - log p_t) to grpo.algo.grpo_loss as a per-token advantage (Thinking Machines / tinker
  on-policy distillation, discount 0: a policy gradient on the sampled reverse KL); `on_policy_loss: jsd` is
  TRL's GKD with lambda = 1: the full-vocabulary generalised JSD at each position of the student's samples.
- `sft` (sequence-level KD, DeepSeek-R1's distilled models): SFT on given teacher traces (data.source) through the
  registry's sft runner; producing the traces is the reject stage's job (a recipe chains reject -> distill).

Memory: neither model's [B, T, V] logits exist. The divergences stream over rows of the flattened [N, H] final
hidden states in chunks of `chunk_size`: per chunk both models' logits [chunk, V], the divergence, and its gradient
w.r.t. the student's logits, which is folded into d hidden and d head at once (as Liger's fused losses), so peak
extra memory is O(chunk_size x V). Token log-probs (the advantage form) go through fused_logprob (grpo/logprobs.py).
Under torchrun, kd trains data parallel as SFT does (`batch_size` is the global batch, each rank its contiguous
share, the mean over the global batch's positions), and on_policy as GRPO does (`prompts_per_step` is global; each
rank samples its share with the seeds of one process); under FSDP2 and ZeRO the teacher is sharded like GRPO's
reference. Simplifications: no resume (only the final checkpoint, written atomically); kd batches
sample rows with replacement; one optimizer step per batch of samples (the advantage form's ratio is 1); the
advantage form averages over all tokens of the batch (`bnpo`); on_policy samples with the native engine.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch
from rich.console import Console

from grpo import algo, checkpoint
from grpo.accel import (active_params, all_sum, autocast, backward, barrier, check_replicas, compile_layers,
                        describe, distributed, for_generation, load_frozen, load_trainable, local_elements, make_optimizer,
                        open_metrics, optimizer_step, prepare_trainable, progress, reshard, sampler_dtype,
                        seed_everything, shard_frozen, stage_device, to_device)
from grpo.config import ConfigError, DistillConfig, SFTConfig, stage_runner
from grpo.data import load_rows
from grpo.kernels.logprob import fused_logprob
from grpo.logprobs import TokenLogprobs, build_batch, final_hidden, fusable, policy_logprobs, unwrap
from grpo.models import hf
from grpo.rollout import SamplingParams, make_worker
from grpo.templates import render

# ---------------------------------------------------------------- the chunked vocabulary-wide divergence


class _ChunkedDivergence(torch.autograd.Function):
    """sum_n div(h_s[n] @ w_s.T, h_t[n] @ w_t.T) over row chunks; the student's gradient is formed chunk by chunk
    in forward and saved ([N, Hs] and [V, Hs], the sizes of the inputs), so only chunk x V logits live at once."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, div, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
        g_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for r0 in range(0, h_s.shape[0], chunk):
            hs = h_s[r0: r0 + chunk]  # [C, Hs]
            z_t = h_t[r0: r0 + chunk] @ w_t.T  # [C, V] 'ch,vh->cv' (teacher: no gradient)
            z_s = hs @ w_s.T  # [C, V] 'ch,vh->cv'
            with torch.enable_grad():
                z_s.requires_grad_(need_h or need_w)
                rows = div(z_s, z_t)  # [C]
                dz = torch.autograd.grad(rows.sum(), z_s)[0].to(hs.dtype) if (need_h or need_w) else None
            total += rows.detach().sum()
            if need_h:
                g_h[r0: r0 + chunk] = dz @ w_s  # 'cv,vh->ch'
            if need_w:
                g_w += dz.T @ hs  # 'cv,ch->vh'
        ctx.save_for_backward(g_h, g_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        g_h, g_w = ctx.saved_tensors
        return ((g_h * g).to(ctx.dtypes[0]) if g_h is not None else None,
                (g_w * g).to(ctx.dtypes[1]) if g_w is not None else None, None, None, None, None)


def chunked_divergence(h_s, w_s, h_t, w_t, div, chunk_size: int = 1024) -> torch.Tensor:
    """h_s [N, Hs], w_s [V, Hs] (student head), h_t [N, Ht], w_t [V, Ht] (teacher head, no grad); div: per-row
    [C, V] x [C, V] -> [C] (grpo.algo.DIVERGENCES) -> the sum over the N rows, with O(chunk_size x V) memory."""
    return _ChunkedDivergence.apply(h_s, w_s, h_t.detach(), w_t.detach(), div, int(chunk_size))


def divergence(name: str, beta: float, temperature: float):
    """The per-row divergence named by `loss` / `on_policy_loss: jsd` (grpo.algo.DIVERGENCES), beta and T bound."""
    fn, kw = algo.DIVERGENCES[name], {"temperature": temperature, **({"beta": beta} if name == "jsd" else {})}
    return lambda zs, zt: fn(zs, zt, **kw)


# ---------------------------------------------------------------- models and the one-tokenizer check


def check_vocab(teacher_tok, student_tok, teacher_rows: int, student_rows: int, teacher: str, student: str) -> None:
    """Token-level distillation compares distributions over the same token ids: same vocabulary and head rows."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        t_by_id, s_by_id = {i: t for t, i in t_vocab.items()}, {i: t for t, i in s_vocab.items()}
        first = next(i for i in range(max(len(t_by_id), len(s_by_id)) + 1) if t_by_id.get(i) != s_by_id.get(i))
        raise ConfigError(f"distill: teacher {teacher} and student {student} have different vocabularies: teacher "
                          f"{len(t_vocab)} tokens, student {len(s_vocab)}; first differing id {first}: teacher "
                          f"{t_by_id.get(first)!r} vs student {s_by_id.get(first)!r}")
    if teacher_rows != student_rows:
        raise ConfigError(f"distill: teacher {teacher} has {teacher_rows} LM-head rows, student {student} has "
                          f"{student_rows} (same tokenizer of {len(t_vocab)} tokens, differently padded heads)")


def load_pair(cfg: DistillConfig, model_path: str | None, console: Console):
    """(student, teacher frozen, tokenizer); the student is `init` built on the teacher's vocabulary, or loaded."""
    if cfg.init is None and model_path is None:
        raise ConfigError("distill needs a student: `model` (an HF directory) or `init` (a config to build from)")
    t_tok = hf.load_tokenizer(cfg.teacher)
    if cfg.init is None:
        s_tok = hf.load_tokenizer(model_path)
        rows = [json.loads((Path(p) / "config.json").read_text()).get("vocab_size") for p in (cfg.teacher, model_path)]
        check_vocab(t_tok, s_tok, rows[0], rows[1], cfg.teacher, model_path)
    teacher, tok = load_frozen(cfg.teacher, cfg.runtime)  # reference_dtype: the teacher may be bf16
    if cfg.init is not None:
        rows = teacher.get_output_embeddings().weight.shape[0]
        student = hf.build_from_config(cfg.init, rows, tok.pad_token_id, tok.eos_token_id, cfg.seed)
        console.print(f"\\[distill] built {cfg.init.get('model_type') or cfg.init.get('preset')} student: "
                      f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, vocab {rows}")
        student = prepare_trainable(student, cfg.runtime)
    else:
        student, tok = load_trainable(model_path, cfg.runtime)
    return compile_layers(student, cfg.runtime), compile_layers(teacher, cfg.runtime), tok


def _need_fused(model, role: str, what: str) -> None:
    if not fusable(model):
        raise ConfigError(f"distill: {what} needs a plain linear LM head on the {role} "
                          f"({type(model).__name__} transforms its logits); mode on_policy with on_policy_loss: "
                          f"advantage works with any head")


# ---------------------------------------------------------------- kd: dataset text


def _join(prompt_text: str, completion: str) -> str:
    """Completion text as appended to the prompt (the same rule as SFT's)."""
    return completion if (not prompt_text or prompt_text[-1].isspace() or completion[:1].isspace()) else " " + completion


def encode(rows: list[dict], tok, template: str, max_length: int, loss_on: str) -> list[tuple[list[int], int]]:
    """(prompt + completion + EOS ids cut to max_length, first labelled position) per row."""
    prompts = [render(template, r["prompt"], tok) for r in rows]
    p_ids = tok(prompts, add_special_tokens=False).input_ids
    c_ids = tok([_join(p, r["completion"]) for p, r in zip(prompts, rows)], add_special_tokens=False).input_ids
    out = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        if len(p) >= max_length:
            raise ConfigError(f"distill: row {i}: prompt is {len(p)} tokens, longer than max_length={max_length}")
        out.append(((p + c + [tok.eos_token_id])[:max_length], 1 if loss_on == "all" else len(p)))
    return out


def kd_batch(seqs: list[tuple[list[int], int]], pad_id: int, dev: torch.device):
    """(ids, attention mask, positions [B, L], sel [B, L-1]: position i predicts a labelled token) of the rows,
    right-padded, on `dev`."""
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    label = torch.zeros((len(seqs), L), dtype=torch.bool)  # label[b, i]: token i is predicted (from position i - 1)
    for b, (s, start) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        label[b, start: len(s)] = True
    attn = (torch.arange(L)[None] < torch.tensor([len(s) for s, _ in seqs])[:, None]).long()
    pos = torch.arange(L)[None].expand_as(ids)
    return ids.to(dev), attn.to(dev), pos.to(dev), label[:, 1:].to(dev)


class KDLoss(torch.nn.Module):
    """kd's student side as one module's forward, so that DDP / FSDP2 / ZeRO wrap all of it (the divergence reads
    the student's head weight directly, which must happen inside the wrapped forward); returns the summed
    divergence over the selected positions."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student  # what trains: the LM, or its peft wrapper (the adapter runs inside the LM)

    def forward(self, ids, attn, pos, sel, h_t, w_t, div, chunk: int):
        lm = unwrap(self.student)
        h_s = final_hidden(lm, ids, attn, pos)[:, :-1][sel]  # [N, Hs]
        return chunked_divergence(h_s, lm.get_output_embeddings().weight, h_t, w_t, div, chunk)


class Hidden(torch.nn.Module):
    """A frozen LM's final hidden states [B, L, H] and head weight [V, H] as one module's forward: the root unit of
    a sharded teacher, whose forward gathers its embedding and head (reshard it once they are used)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids, attn, pos):
        return final_hidden(self.lm, ids, attn, pos), self.lm.get_output_embeddings().weight


def kd_step(loss: KDLoss, teacher: Hidden, seqs: list[tuple[list[int], int]], pad_id: int, div, chunk: int,
            dev: torch.device) -> tuple[torch.Tensor, int]:
    """(summed divergence over the labelled next-token positions of the rows, their count)."""
    ids, attn, pos, sel = kd_batch(seqs, pad_id, dev)
    with torch.no_grad():
        h_t, w_t = teacher(ids, attn, pos)
        h_t = h_t[:, :-1][sel]  # [N, Ht]
    return loss(ids, attn, pos, sel, h_t, w_t, div, chunk), int(sel.sum())


# ---------------------------------------------------------------- on_policy: the student's own samples


def on_policy_step(loss_mod, teacher, prompts: list[list[int]], comps, pad_id: int, div, cfg: DistillConfig,
                   dev: torch.device) -> tuple[torch.Tensor, int, dict[str, float]]:
    """(summed loss over this rank's sampled tokens, their count, {metric: its sum over them}) for the student's
    samples `comps` of `prompts`. loss_mod: the (wrapped) student side, TokenLogprobs for the advantage form and
    KDLoss for jsd; teacher: TokenLogprobs or Hidden around the frozen teacher. The reverse KL log p_s - log p_t of
    the sampled tokens is a metric."""
    T = cfg.sampling.temperature
    if cfg.on_policy_loss == "advantage":
        batch = to_device(build_batch(prompts, comps, pad_id), dev)
        mask = batch["completion_mask"]
        lp, ent = policy_logprobs(loss_mod, batch, slice(None), T)
        with torch.no_grad():
            t_lp = policy_logprobs(teacher, batch, slice(None), T)[0]
        adv = algo.reverse_kl_advantages(lp, t_lp)  # [B, Lc]
        loss, _ = algo.grpo_loss(lp, lp.detach(), None, adv, mask, loss_type="bnpo")  # this rank's token mean
        n = int(mask.sum())
        return loss * n, n, {"reverse_kl": float((-adv * mask).sum()), "entropy": float((ent * mask).sum())}
    seqs = [(prompts[c.prompt_index] + c.token_ids, len(prompts[c.prompt_index])) for c in comps]
    ids, attn, pos, sel = kd_batch(seqs, pad_id, dev)
    with torch.no_grad():
        h_t, w_t = teacher(ids, attn, pos)
        h_t = h_t[:, :-1][sel]  # [N, Ht]: the positions predicting each sampled token, rows in comps' order
        t_lp = fused_logprob(h_t, w_t, ids[:, 1:][sel], T)[0]
    total = loss_mod(ids, attn, pos, sel, h_t, w_t, div, cfg.chunk_size)
    sampled = torch.tensor([x for c in comps for x in c.logprobs], device=dev)  # log p_s when the student sampled
    return total, int(sel.sum()), {"reverse_kl": float((sampled - t_lp).sum())}


# ---------------------------------------------------------------- the stage


def train(cfg: DistillConfig, model_path: str | None, out_dir: Path, console: Console | None = None) -> Path:
    """Run the distill stage; returns the student's final checkpoint directory (out_dir/final). Under torchrun, kd
    and on_policy train data parallel as SFT and GRPO do (runtime.distributed: DDP, FSDP2 or ZeRO; the teacher
    sharded too under FSDP2 and ZeRO)."""
    console = console or Console()
    model_path = model_path or cfg.model
    if cfg.mode == "sft":  # sequence-level KD: SFT on the traces, with the shared fields passed through
        shared = {k: getattr(cfg, k) for k in SFTConfig.model_fields if k in DistillConfig.model_fields and k != "kind"}
        return stage_runner("sft")(SFTConfig(**shared), model_path, out_dir, console)
    kd = cfg.mode == "kd"
    seed_everything(cfg.seed)
    rt = cfg.runtime
    trained, teacher, tok = load_pair(cfg, model_path, console)
    student = unwrap(trained)  # what computes (a LoRA adapter runs inside it); `trained` is what steps and saves
    wide = kd or cfg.on_policy_loss == "jsd"  # a vocabulary-wide divergence (KDLoss, the teacher's Hidden)
    if wide:
        _need_fused(student, "student", f"mode {cfg.mode} with a vocabulary-wide loss")
        _need_fused(teacher, "teacher", f"mode {cfg.mode} with a vocabulary-wide loss")
    data_cfg = cfg.data.model_copy(update={"completion_column": cfg.data.completion_column or "solution"}) if kd else cfg.data
    rows = load_rows(data_cfg, require_answer=False)
    n_s, n_t = active_params(student), active_params(teacher)
    opt, sched = make_optimizer(trained, cfg, cfg.steps)
    device = stage_device(rt)
    if kd:
        seqs = encode(rows, tok, cfg.template, cfg.max_length, cfg.loss_on)
        div = divergence(cfg.loss, cfg.jsd_beta, cfg.temperature)
    else:
        prompts = [render(cfg.template, r["prompt"], tok, **{k: v for k, v in r.items() if k != "prompt"}) for r in rows]
        prompt_ids = tok(prompts, add_special_tokens=False).input_ids
        div = divergence("jsd", cfg.jsd_beta, cfg.sampling.temperature) if wide else None
    # the student's loss module goes to DDP / FSDP2 / ZeRO (its forward is the student's whole loss); the teacher's
    # forward is its own root unit, sharded alike under FSDP2 and ZeRO
    wrapped, opt, rank, world = distributed(KDLoss(trained) if wide else TokenLogprobs(trained), opt, rt,
                                            cfg.max_grad_norm)
    t_mod = shard_frozen(Hidden(teacher) if wide else TokenLogprobs(teacher), wrapped, world, device)
    field, size = ("batch_size", cfg.batch_size) if kd else ("prompts_per_step", cfg.prompts_per_step)
    if size % world:
        raise ValueError(f"{field}={size} must divide evenly over {world} processes")
    if world > 1 and rank == 0:
        held, total = local_elements(t_mod)
        console.print(f"\\[distill] {describe(wrapped, world)}" + (
            f"; teacher sharded too: rank 0 holds {held} of {total} elements" if held < total else ""))
    if not kd:  # FSDP2 / ZeRO-3: the student samples on its gathered weights (sharded again by sleep())
        worker = for_generation(make_worker("native", student, tok, model_path, sampler_dtype=sampler_dtype(rt)),
                                wrapped)
    main = rank == 0
    spent = {"flops": 0.0, "seconds": 0.0}  # compute so far (compute/* metrics), the teacher's forwards included
    rng = random.Random(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.train()
    with open_metrics(out_dir / "metrics.jsonl", main=main) as log, \
            progress(console) if main else contextlib.nullcontext() as bar:
        task = bar.add_task(f"distill {cfg.mode}", total=cfg.steps, info="") if main else None
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            if kd:
                batch_seqs = [seqs[rng.randrange(len(seqs))] for _ in range(cfg.batch_size)]  # the global batch
                mine = batch_seqs[rank * cfg.batch_size // world: (rank + 1) * cfg.batch_size // world]
                with autocast(rt):
                    total_mine, n_mine = kd_step(wrapped, t_mod, mine, tok.pad_token_id, div, cfg.chunk_size, device)
                n = max(all_sum(float(n_mine), world), 1.0)
                loss = torch.tensor(all_sum(float(total_mine.detach()), world) / n)  # the global batch's mean
                extra = {"tokens": int(n), "num_processes": world}
                step_flops = (2 * n_t + 6 * n_s) * n  # teacher forward, student forward + backward
            else:
                idx = [rng.randrange(len(rows)) for _ in range(cfg.prompts_per_step)]  # the global batch of prompts
                lo, hi = rank * len(idx) // world, (rank + 1) * len(idx) // world
                mine = [prompt_ids[i] for i in idx[lo:hi]]  # this rank's share, seeded as in one process
                sp = cfg.sampling
                student.eval()
                comps = worker.generate(mine, cfg.group_size, SamplingParams(
                    temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_tokens=sp.max_tokens,
                    stop=list(sp.stop), seed=cfg.seed * 1_000_003 + step, first_index=lo))
                worker.sleep()
                student.train()
                with autocast(rt):
                    total_mine, n_mine, sums = on_policy_step(wrapped, t_mod, mine, comps, tok.pad_token_id, div, cfg,
                                                              device)
                n = max(all_sum(float(n_mine), world), 1.0)
                loss = torch.tensor(all_sum(float(total_mine.detach()), world) / n)  # the global batch's mean
                extra = {k: all_sum(v, world) / n for k, v in sums.items()}
                lengths = all_sum(float(sum(len(c.token_ids) for c in comps)), world)
                extra.update({"tokens": int(n), "num_processes": world,
                              "completions/mean_length": lengths / (cfg.prompts_per_step * cfg.group_size)})
                # sampling, the teacher's scoring, the student's update
                seq = all_sum(float(n_mine + sum(len(p) for p in mine) * cfg.group_size), world)
                step_flops = 2 * n_s * (n + all_sum(float(sum(map(len, mine))), world)) + (2 * n_t + 6 * n_s) * seq
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"distill step {step + 1}: loss is {loss.item()}")
            # this rank's sum over the global count, x world because the gradient reduction averages ranks
            backward(wrapped, total_mine / n * world)
            reshard(t_mod)  # a sharded teacher frees the embedding and head it gathered
            grad_norm = optimizer_step(trained, opt, sched, cfg.max_grad_norm, wrapped)
            if not kd:
                worker.update_weights(student)  # a sampler copy (runtime.sampler_dtype) takes the new weights
            m = {"step": step + 1, "loss": loss.item(), **extra, "grad_norm": grad_norm.item(),
                 "learning_rate": sched.get_last_lr()[0], "step_time": time.perf_counter() - t0}
            spent["flops"] += step_flops
            spent["seconds"] += m["step_time"]
            m["compute/flops"], m["compute/seconds"] = spent["flops"], spent["seconds"]
            log.write(json.dumps(m) + "\n")
            log.flush()
            if main:
                info = f"loss {m['loss']:.4f}" + (f" reverse_kl {m['reverse_kl']:.4f}" if "reverse_kl" in m else "")
                bar.update(task, advance=1, info=info)
    check_replicas(trained, world, "distill")
    final = checkpoint.save(out_dir / "final", trained, tok, wrapped=wrapped)  # every rank: FSDP2/ZeRO-3 gather
    barrier(world)  # no rank returns before the checkpoint is in place
    return final
