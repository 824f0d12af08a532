"""GRPO stage: sample G completions per prompt, score them, normalise rewards within each group, and take a
clipped-ratio policy-gradient step with a k3 KL penalty against a frozen reference; then sync the sampler.

Log-probs come from the policy's hidden states through fused_logprob (grpo/logprobs.py: no [b, Lc, V] logits).
Data parallel: under `torchrun` (WORLD_SIZE > 1) accelerate wraps that scorer module, policy inside, in DDP, so
the loss forward runs through DDP and the gradients are averaged; `prompts_per_step` is the global batch, split
evenly over ranks, each rank samples and scores whole groups of its own prompts, and rank 0 logs and saves.
Simplifications: the reference model is a frozen copy of the starting policy; with num_iterations == 1 the "old"
log-probs are the current ones detached (ratio == 1, as in TRL), otherwise they are computed once before the
updates; token-level loss types normalise per rank; r1kit's DeepSeek balance loss (aux_loss) is not added.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from rich.console import Console

import rewards as reward_lib
from grpo import algo, checkpoint
from grpo.config import GRPOConfig
from grpo.data import load_rows
from grpo.logprobs import TokenLogprobs
from grpo.models import hf
from grpo.rollout import SamplingParams, make_worker
from grpo.sft import make_optimizer, progress
from grpo.templates import render


def build_batch(prompt_ids: list[list[int]], comps, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded completions, so every completion starts at column Lp.
    Returns input_ids/attention_mask/position_ids [B, Lp+Lc], completion_ids/completion_mask/behaviour_logprobs [B, Lc]."""
    Lp = max(len(prompt_ids[c.prompt_index]) for c in comps)
    Lc = max(1, max(len(c.token_ids) for c in comps))
    B = len(comps)
    ids = torch.full((B, Lp + Lc), pad_id, dtype=torch.long)
    attn = torch.zeros((B, Lp + Lc), dtype=torch.long)
    behaviour = torch.zeros((B, Lc))
    for i, c in enumerate(comps):
        p = prompt_ids[c.prompt_index]
        ids[i, Lp - len(p): Lp] = torch.tensor(p)
        ids[i, Lp: Lp + len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        attn[i, Lp - len(p): Lp + len(c.token_ids)] = 1
        if c.logprobs:
            behaviour[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "completion_ids": ids[:, Lp:], "completion_mask": attn[:, Lp:].float(), "prompt_len": Lp,
            "behaviour_logprobs": behaviour}


def policy_logprobs(scorer, batch: dict, rows: slice, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies [b, Lc] of the completion tokens of batch[rows]; scorer: a TokenLogprobs
    around the model (or DDP around one)."""
    return scorer(batch["input_ids"][rows], batch["attention_mask"][rows], batch["position_ids"][rows],
                  batch["completion_ids"][rows], batch["prompt_len"], temperature)


def micro_slices(B: int, size: int) -> list[slice]:
    """Row slices of at most `size` covering a batch of B."""
    return [slice(s, min(s + size, B)) for s in range(0, B, size)]


def backward_batch(scorer, batch: dict, adv: torch.Tensor, old_lp, ref_lp, cfg: GRPOConfig) -> dict[str, float]:
    """Accumulate the gradient of the whole batch's GRPO loss, micro-batch by micro-batch (the micro-batch
    losses are weighted so that they add up to the full-batch loss for every loss_type); returns metrics."""
    mask = batch["completion_mask"]
    B, n_tok = mask.shape[0], mask.sum()
    agg: dict[str, float] = {"loss": 0.0}
    for m in micro_slices(B, cfg.micro_batch_size):
        # under DDP, all-reduce gradients once, on the last micro-batch
        sync = contextlib.nullcontext() if m.stop == B or not hasattr(scorer, "no_sync") else scorer.no_sync()
        with sync:
            lp, ent = policy_logprobs(scorer, batch, m, cfg.sampling.temperature)
            loss, mets = algo.grpo_loss(lp, old_lp[m] if old_lp is not None else lp.detach(), ref_lp[m] if ref_lp is not None else None,
                                        adv[m], mask[m], epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                        loss_type=cfg.loss_type, max_len=mask.shape[1])
            share = mask[m].sum() / n_tok if cfg.loss_type == "bnpo" else (m.stop - m.start) / B
            (loss * share).backward()
        agg["loss"] += float(loss.detach() * share)
        w = float(mask[m].sum() / n_tok)  # token-weighted averages of the per-token metrics
        # sampler/trainer mismatch: |log p_trainer - log p_sampler| per token (0 for the native engine)
        gap = algo.masked_mean((lp.detach() - batch["behaviour_logprobs"][m]).abs(), mask[m])
        for k, v in {**mets, "entropy": algo.masked_mean(ent, mask[m]), "rollout/logprob_abs_diff": gap}.items():
            agg[k] = agg.get(k, 0.0) + float(v) * w
    return agg


def _distributed(model, opt):
    """Under torchrun: (DDP-wrapped model, optimizer, rank, world size) through accelerate; else unchanged.
    Gradients all-reduce only for parameters used inside the wrapped module's forward: wrap the module that runs
    the whole loss forward (the TokenLogprobs scorer), never call its inner model directly for the loss."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return model, opt, 0, 1
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # unused parameters are normal here: MTP heads and experts that got no token in a step
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model, opt = acc.prepare(model, opt)
    return model, opt, acc.process_index, acc.num_processes


def _reduce(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Average scalar metrics over ranks (min/max lengths by min/max)."""
    if world == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    lo, hi = vals.clone(), vals.clone()
    for t, op in ((vals, dist.ReduceOp.SUM), (lo, dist.ReduceOp.MIN), (hi, dist.ReduceOp.MAX)):
        dist.all_reduce(t, op=op)
    out = {k: float(v) / world for k, v in zip(keys, vals)}
    out.update({k: float(lo[i]) for i, k in enumerate(keys) if k.endswith("min_length")})
    out.update({k: float(hi[i]) for i, k in enumerate(keys) if k.endswith("max_length")})
    return out


def _check_replicas(model, world: int) -> None:
    """DDP must leave every rank with the same weights; fail loudly rather than save one rank's drift."""
    if world == 1:
        return
    import torch.distributed as dist

    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    seen = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(seen, total)
    if any(not torch.allclose(x, seen[0], rtol=1e-9, atol=1e-9) for x in seen):
        raise RuntimeError(f"GRPO replicas diverged across ranks: parameter sums {[float(x) for x in seen]}")


def train(cfg: GRPOConfig, model_path: str, out_dir: Path, console: Console | None = None) -> Path:
    """Run GRPO from `model_path`; writes out_dir/metrics.jsonl and returns the final checkpoint out_dir/final."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    reward_set = reward_lib.RewardSet.from_specs([r.model_dump() for r in cfg.rewards])
    rows = load_rows(cfg.data)
    model, tok = hf.load(model_path)
    ref = TokenLogprobs(copy.deepcopy(model).eval().requires_grad_(False)) if cfg.beta > 0 else None  # the starting policy, frozen
    opt, sched = make_optimizer(model, cfg, cfg.steps)
    start, cursor = 0, 0
    last = out_dir / "last"
    if cfg.resume and (last / "trainer_state").is_dir():  # exact resume: weights, optimizer, RNG, step, data cursor
        model, tok = hf.load(str(last))
        opt, sched = make_optimizer(model, cfg, cfg.steps)
        state = checkpoint.load_state(last, opt, sched)
        start, cursor = state["step"], state["cursor"]
        log_file = out_dir / "metrics.jsonl"  # drop lines of steps after the checkpoint: they are redone
        if log_file.is_file():
            kept = [l for l in log_file.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
            log_file.write_text("".join(l + "\n" for l in kept))
        console.print(f"[grpo] resumed from {last} at step {start}")
    policy = model  # the plain module: sampling, checkpoints and weight pushes use it
    local = TokenLogprobs(policy)  # fused log-probs from the policy's hidden states (grpo/logprobs.py)
    scorer, opt, rank, world = _distributed(local, opt)  # DDP wraps the scorer: its forward is what backward runs
    if cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must divide evenly over {world} processes")
    main = rank == 0
    worker = make_worker(cfg.rollout, policy, tok, model_path, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)
    if start > 0:
        worker.update_weights(policy)  # the module: parameters plus persistent buffers (MoE router bias)
    prompts = [render(cfg.template, r["prompt"], tok, **{k: v for k, v in r.items() if k != "prompt"}) for r in rows]
    prompt_ids = tok(prompts, add_special_tokens=False).input_ids
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    sp = cfg.sampling
    columns_keys = [k for k in rows[0] if k != "prompt"]
    G, P = cfg.group_size, cfg.prompts_per_step // world  # P: this rank's prompts per step
    scorer.train()
    log = open(out_dir / "metrics.jsonl", "a" if start else "w") if main else open(os.devnull, "w")
    with log, progress(console) if main else contextlib.nullcontext() as bar:
        task = bar.add_task("grpo", total=cfg.steps, completed=start, info="") if main else None
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            idx = [order[(cursor + rank * P + i) % len(order)] for i in range(P)]  # this rank's shard of the batch
            cursor += P * world
            # 1. rollouts: G samples per prompt, grouped prompt-major
            sampling = SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_tokens=sp.max_tokens,
                                      stop=list(sp.stop), seed=cfg.seed * 1_000_003 + step * world + rank)
            comps = worker.generate([prompt_ids[i] for i in idx], G, sampling)
            worker.sleep()  # colocated vLLM on GPU frees its memory for the update; no-op for native
            t_gen = time.perf_counter() - t0
            # 2. rewards with the TRL signature; every dataset column travels along
            src = [rows[idx[c.prompt_index]] for c in comps]
            columns = {k: [r.get(k) for r in src] for k in columns_keys}
            totals, per = reward_set([c.text for c in comps], [prompts[idx[c.prompt_index]] for c in comps],
                                     completion_ids=[c.token_ids for c in comps], **columns)
            rewards_t = torch.tensor(totals)
            adv = algo.group_advantages(rewards_t, G, cfg.advantage_scale)
            # 3. log-probs: reference (frozen) and old (for num_iterations > 1), then the clipped update(s)
            batch = build_batch([prompt_ids[i] for i in idx], comps, tok.pad_token_id)
            B = len(comps)
            micro = micro_slices(B, cfg.micro_batch_size)
            with torch.no_grad():
                ref_lp = torch.cat([policy_logprobs(ref, batch, m, sp.temperature)[0] for m in micro]) if ref is not None else None
                old_lp = torch.cat([policy_logprobs(local, batch, m, sp.temperature)[0] for m in micro]) if cfg.num_iterations > 1 else None
            agg: dict[str, float] = {}
            for _ in range(cfg.num_iterations):
                for k, v in backward_batch(scorer, batch, adv, old_lp, ref_lp, cfg).items():
                    agg[k] = agg.get(k, 0.0) + v / cfg.num_iterations
                grad_norm = torch.nn.utils.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if hasattr(policy, "update_expert_bias"):  # DeepSeek-V3 aux-loss-free balancing
                    for k, v in policy.update_expert_bias().items():
                        agg[f"moe/{k}"] = v
            sched.step()
            # 4. push the new weights to the sampler (a no-op for the native engine, which shares them)
            t_sync = time.perf_counter()
            worker.wake()
            worker.update_weights(policy)  # the module: parameters plus persistent buffers (MoE router bias)
            t_sync = time.perf_counter() - t_sync
            lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float)
            std_per_group = rewards_t.view(-1, G).std(dim=1)
            metrics = {"step": step + 1, "reward": rewards_t.mean().item(), "reward_std": std_per_group.mean().item(),
                       "frac_reward_zero_std": (std_per_group < 1e-6).float().mean().item(),
                       **reward_lib.RewardSet.metrics(per), **agg, "grad_norm": grad_norm.item(), "learning_rate": sched.get_last_lr()[0],
                       "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                       "completions/max_length": lengths.max().item(),
                       "completions/clipped_ratio": sum(c.finish_reason == "length" for c in comps) / B,
                       "time/generate": t_gen, "time/weight_sync": t_sync, "time/step": time.perf_counter() - t0}
            metrics = {**_reduce(metrics, world), "step": step + 1, "num_processes": world}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"grpo step {step + 1}: loss is {metrics['loss']}")
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            fmt = metrics.get("rewards/format/mean", float("nan"))
            if main:
                bar.update(task, advance=1, info=f"reward {metrics['reward']:.3f} format {fmt:.2f} len {metrics['completions/mean_length']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _check_replicas(policy, world)
                if main:
                    checkpoint.save(last, policy, tok, {"step": step + 1, "cursor": cursor}, opt, sched)
    _check_replicas(policy, world)
    final = out_dir / "final"
    if main:
        checkpoint.save(final, policy, tok)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank returns before the checkpoint is in place
    if hasattr(worker, "close"):
        worker.close()
    return final
