"""GRPO stage: sample G completions per prompt, score them, normalise rewards within each group, and take a
clipped-ratio policy-gradient step with a k3 KL penalty against a frozen reference; then sync the sampler.

Log-probs come from the policy's hidden states through fused_logprob (grpo/logprobs.py: no [b, Lc, V] logits).
Data parallel: under `torchrun` (WORLD_SIZE > 1) accelerate wraps that scorer module, policy inside, in DDP or a
DeepSpeed ZeRO-2 engine (or FSDP2 shards it: runtime.distributed), so the loss forward runs through the wrapper
and the gradients are averaged; `prompts_per_step` is the global batch, split evenly over ranks, each rank samples
and scores whole groups of its own prompts, and rank 0 logs and saves.
Loss types, importance sampling (token / sequence), TIS and the clipped variants are grpo.algo's registry; dynamic
sampling (drop groups whose rewards agree, draw more prompts) is grpo/dynamic.py; without it the rewards are scored on
a helper thread while the reference pass runs; metrics go through
grpo.accel.Trackers (jsonl, tensorboard, wandb). A step whose gradient is not finite is skipped and counted
(`nonfinite/skipped`); max_nonfinite_steps of them in a row stop the run with a message.
Simplifications: the reference model is a frozen copy of the starting policy (replaced by the policy every
ref_reset_every steps, as R1 did); with num_iterations == 1 the "old" log-probs are the current ones detached
(ratio == 1, as in TRL), otherwise they are computed once before the updates; token-level loss types normalise
per rank; r1kit's DeepSeek balance loss (aux_loss) is not added.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

import rewards as reward_lib
from rewards.runner import PerReward
from grpo import algo, checkpoint, dynamic
from grpo.accel import (Trackers, active_params, adapter_disabled, apply_gradients, autocast, backward, barrier,
                        check_replicas, compile_layers, copy_weights, describe, distributed, expert_bias_step,
                        for_generation, frozen_copy, full_state_dict, is_fsdp2, load_trainable, local_elements,
                        make_optimizer, progress, reduce_metrics, reshard, sampler_dtype, seed_everything,
                        shard_frozen, stage_device, to_device, zero3)
from grpo.config import GRPOConfig
from grpo.data import load_rows
from grpo.logprobs import TokenLogprobs, build_batch, in_order, micro_batches, policy_logprobs
from grpo.rollout import SamplingParams, make_worker
from grpo.templates import render


def backward_batch(scorer, batch: dict, micro: list[torch.Tensor], adv: torch.Tensor, old_lp, ref_lp,
                   cfg: GRPOConfig) -> dict[str, float]:
    """Accumulate the gradient of the whole batch's GRPO loss, micro-batch by micro-batch (micro: their row
    indices; the micro-batch losses are weighted so that they add up to the full-batch loss for every loss_type,
    whichever rows go together); returns metrics."""
    mask = batch["completion_mask"]
    B, n_tok = mask.shape[0], mask.sum().clamp(min=1)
    agg: dict[str, float] = {"loss": 0.0}
    for i, m in enumerate(micro):
        last = i == len(micro) - 1
        # under DDP, all-reduce gradients once, on the last micro-batch
        ddp = isinstance(scorer, torch.nn.parallel.DistributedDataParallel)  # (ZeRO: the boundary flag in backward)
        sync = scorer.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync, autocast(cfg.runtime):
            lp, ent = policy_logprobs(scorer, batch, m, cfg.sampling.temperature, replay=cfg.routing_replay)
            old = old_lp[m] if old_lp is not None else lp.detach()
            tis = None if cfg.tis is None else algo.truncated_is_weights(
                old, batch["behaviour_logprobs"][m], mask[m], level=cfg.tis.level, mode=cfg.tis.mode, cap=cfg.tis.cap)
            loss, mets = algo.grpo_loss(lp, old, ref_lp[m] if ref_lp is not None else None, adv[m], mask[m],
                                        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                        loss_type=cfg.loss_type, max_len=mask.shape[1],
                                        importance_sampling=cfg.importance_sampling, is_weights=tis)
            token_level = algo.LOSS_TYPES[cfg.loss_type].aggregation == "token_mean"
            share = mask[m].sum() / n_tok if token_level else len(m) / B
            backward(scorer, loss * share, last=last)
        agg["loss"] += float(loss.detach() * share)
        w = float(mask[m].sum() / n_tok)  # token-weighted averages of the per-token metrics
        # sampler/trainer mismatch: |log p_trainer - log p_sampler| per token (0 for the native engine)
        gap = algo.masked_mean((lp.detach() - batch["behaviour_logprobs"][m]).abs(), mask[m])
        for k, v in {**mets, "entropy": algo.masked_mean(ent, mask[m]), "rollout/logprob_abs_diff": gap}.items():
            agg[k] = max(agg.get(k, 0.0), float(v)) if k.endswith("_max") else agg.get(k, 0.0) + float(v) * w
    return agg


def train(cfg: GRPOConfig, model_path: str, out_dir: Path, console: Console | None = None) -> Path:
    """Run GRPO from `model_path`; writes out_dir/metrics.jsonl and returns the final checkpoint out_dir/final."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    reward_set = reward_lib.RewardSet.from_specs([r.model_dump() for r in cfg.rewards])
    rows = load_rows(cfg.data)
    rt = cfg.runtime
    device = stage_device(rt)
    model, tok = load_trainable(model_path, rt)
    # the starting policy, frozen (reference_dtype); under LoRA none: the policy with its adapter disabled
    frozen = frozen_copy(model, rt) if cfg.beta > 0 else None
    ref = TokenLogprobs(frozen) if frozen is not None else None
    opt, sched = make_optimizer(model, cfg, cfg.steps)
    start, cursor = 0, 0
    spent = {"flops": 0.0, "seconds": 0.0}  # compute so far, all ranks (compute/* metrics)
    last = out_dir / "last"
    if cfg.resume and (last / "trainer_state").is_dir():  # exact resume: weights, optimizer, RNG, step, data cursor
        # LoRA: the base again with the trained adapter; else the full weights of last/
        model, tok = load_trainable(model_path, rt, adapter=last / "adapter") if rt.lora is not None \
            else load_trainable(str(last), rt)
        opt, sched = make_optimizer(model, cfg, cfg.steps)
        state = checkpoint.load_state(last, opt, sched)
        start, cursor = state["step"], state["cursor"]
        spent.update(state.get("compute", {}))
        if ref is not None and "reference" in state:  # reset since the start: the reference of that step
            ref.lm.load_state_dict(state["reference"])
        console.print(f"\\[grpo] resumed from {last} at step {start}")
    policy = compile_layers(model, rt)  # the plain module: sampling, checkpoints and weight pushes use it
    if ref is not None:
        compile_layers(ref.lm, rt)
    n_active = active_params(policy)
    local = TokenLogprobs(policy)  # fused log-probs from the policy's hidden states (grpo/logprobs.py)
    # the KL reference: the frozen copy, or under LoRA the policy itself with its adapter disabled
    ref_scorer, ref_context = ((ref, contextlib.nullcontext) if ref is not None
                               else (local, lambda: adapter_disabled(policy)))
    # DDP or DeepSpeed wraps the scorer, or FSDP2 shards it (root unit) and its layers: its forward runs backward's loss
    scorer, opt, rank, world = distributed(local, opt, rt, cfg.max_grad_norm)
    if zero3(scorer) and cfg.dynamic_sampling:  # ranks would run different numbers of partitioned forwards
        raise ValueError("dynamic_sampling: not supported with runtime.zero_stage 3")
    # FSDP2 / ZeRO: the reference is sharded as well (each rank 1/world of it). Not with dynamic sampling (ZeRO-2
    # only), where ranks may keep different numbers of groups, so run different numbers of reference forwards
    if ref is not None and not cfg.dynamic_sampling:
        shard_frozen(ref, scorer, world, device)
    if start > 0:  # FSDP2 / DeepSpeed: this rank's optimizer shard and RNG (a no-op otherwise)
        checkpoint.load_shard(last, opt, scorer)
    if is_fsdp2(scorer) and cfg.dynamic_sampling:  # ranks would run different numbers of sharded forwards
        raise ValueError("dynamic_sampling: not supported with runtime.distributed fsdp2")
    if cfg.rollout == "server" and world > 1 and cfg.dynamic_sampling:  # rank 0 relays: ranks must draw alike
        raise ValueError("dynamic_sampling with rollout: server under torchrun is not supported")
    if cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must divide evenly over {world} processes")
    main = rank == 0
    if world > 1 and main:
        held, total = local_elements(ref) if ref is not None else (0, 0)
        console.print(f"\\[grpo] {describe(scorer, world)}" + (f"; KL reference sharded too: rank 0 holds {held} of "
                                                               f"{total} elements" if held < total else ""))
    if cfg.routing_replay and not hasattr(policy, "routed_layers"):
        raise ValueError(f"routing_replay: {model_path} is not r1kit's DeepSeek MoE model (no routed experts)")
    worker = make_worker(cfg.rollout, policy, tok, model_path, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                         seed=cfg.seed, record_routing=cfg.routing_replay, sleep_level=cfg.vllm_sleep_level,
                         sampler_dtype=sampler_dtype(rt),
                         tensor_parallel_size=cfg.vllm_tensor_parallel_size, server=cfg.vllm_server, world=world,
                         rank=rank)
    worker = for_generation(worker, scorer)  # FSDP2: generate on unsharded weights, no collective inside
    if main and getattr(worker, "tp_group", None) is not None:  # vLLM's own group (vllm_tensor_parallel_size)
        console.print(f"\\[grpo] vLLM tensor parallel: ranks {worker.tp_group.ranks} run one engine, a shard each")
    if start > 0 or cfg.rollout == "server":  # a server loaded its own checkpoint (or an older run's weights)
        worker.update_weights(policy)  # the module: parameters plus persistent buffers (MoE router bias)
    prompts = [render(cfg.template, r["prompt"], tok, **{k: v for k, v in r.items() if k != "prompt"}) for r in rows]
    prompt_ids = tok(prompts, add_special_tokens=False).input_ids
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    sp = cfg.sampling
    columns_keys = [k for k in rows[0] if k != "prompt"]
    G, P = cfg.group_size, cfg.prompts_per_step // world  # P: this rank's prompts per step
    draws = cfg.dynamic_sampling.max_batches if cfg.dynamic_sampling else 1  # prompt draws allowed per step
    scorer.train()
    log = Trackers(out_dir, cfg.report_to, start, main, run_name=out_dir.name, config=cfg.model_dump(mode="json"))
    nonfinite = 0  # consecutive steps whose gradient was not finite (their update skipped)
    reward_thread = ThreadPoolExecutor(1, thread_name_prefix="r1kit-rewards")  # scoring beside the reference pass
    with log, reward_thread, progress(console) if main else contextlib.nullcontext() as bar:
        task = bar.add_task("grpo", total=cfg.steps, completed=start, info="") if main else None
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            counts: dict = {}  # the reward counters (timeouts, errors, ...) of every draw
            timers = {"time/reward": 0.0}

            def sample(d: int) -> tuple[list[int], list]:
                """The next P prompts of this rank (draw d of this step) and G samples of each, prompt-major."""
                nonlocal cursor
                idx = [order[(cursor + rank * P + i) % len(order)] for i in range(P)]  # this rank's shard
                cursor += P * world
                sampling = SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                          max_tokens=sp.max_tokens, stop=list(sp.stop),
                                          seed=cfg.seed * 1_000_003 + (step * draws + d) * world + rank)
                return idx, worker.generate([prompt_ids[i] for i in idx], G, sampling)

            def score(idx: list[int], comps: list) -> list[dynamic.Group]:
                """Rewards with the TRL signature (every dataset column travels along), as P groups of G."""
                t_r = time.perf_counter()
                src = [rows[idx[c.prompt_index]] for c in comps]
                columns = {k: [r.get(k) for r in src] for k in columns_keys}
                totals, per = reward_set([c.text for c in comps], [prompts[idx[c.prompt_index]] for c in comps],
                                         completion_ids=[c.token_ids for c in comps], **columns)
                for label, c in getattr(per, "counts", {}).items():
                    counts[label] = counts.get(label, Counter()) + c
                timers["time/reward"] += time.perf_counter() - t_r
                return [dynamic.Group(idx[p], comps[p * G:(p + 1) * G], totals[p * G:(p + 1) * G],
                                      {k: v[p * G:(p + 1) * G] for k, v in per.items()}) for p in range(P)]

            # 1. rollouts, 2. rewards. Plain GRPO scores on a helper thread while the reference pass runs below
            # (rewards are Python or subprocesses, the pass is torch ops that release the GIL); dynamic sampling
            # needs every draw's rewards first, to pick the informative groups
            if draws == 1:
                idx, comps = sample(0)
                t_gen, ds_metrics = time.perf_counter() - t0, {}
                scored = reward_thread.submit(score, idx, comps)
            else:
                groups, ds_metrics = dynamic.fill(lambda d: score(*sample(d)), P, draws)
                t_gen, scored = time.perf_counter() - t0 - timers["time/reward"], None
                idx, comps, totals, per = dynamic.flatten(groups)
            if cfg.rollout != "server":  # colocated vLLM frees its memory for the update, FSDP2 reshards (native)
                worker.sleep()
            # 3. log-probs: reference (frozen) and old (for num_iterations > 1), then the clipped update(s)
            batch = build_batch([prompt_ids[i] for i in idx], comps, tok.pad_token_id)
            if cfg.mask_truncated_completions:  # cut at max_tokens: no loss on them (their rewards still count)
                cut = torch.tensor([c.finish_reason == "length" for c in comps])
                batch["completion_mask"][cut] = 0.0
            batch = to_device(batch, device)
            B = len(comps)
            # rows of like length together, each micro-batch cut to its own columns (grpo/logprobs.py)
            micro = micro_batches(batch["attention_mask"].sum(1), cfg.micro_batch_size)
            t_ref = time.perf_counter()
            with torch.no_grad(), autocast(rt):
                ref_lp = None
                if cfg.beta > 0:
                    with ref_context():
                        ref_lp = in_order(micro, [policy_logprobs(ref_scorer, batch, m, sp.temperature)[0]
                                                  for m in micro])
                    if ref is not None:
                        reshard(ref)  # a sharded reference frees the embedding and head it gathered
                t_old = time.perf_counter()
                old_lp = in_order(micro, [policy_logprobs(local, batch, m, sp.temperature,
                                                          replay=cfg.routing_replay)[0]
                                          for m in micro]) if cfg.num_iterations > 1 else None
            if scored is not None:  # the draw's groups, in its prompt order: comps and idx are unchanged
                _, _, totals, per = dynamic.flatten(scored.result())
            per = PerReward(per)
            per.counts = counts
            rewards_t = torch.tensor(totals)
            adv = algo.group_advantages(rewards_t, G, cfg.advantage_scale).to(device)
            t_update = time.perf_counter()
            timers.update({"time/ref": t_old - t_ref, "time/old": t_update - t_old})
            agg: dict[str, float] = {"nonfinite/skipped": 0.0}
            for _ in range(cfg.num_iterations):
                for k, v in backward_batch(scorer, batch, micro, adv, old_lp, ref_lp, cfg).items():
                    agg[k] = agg.get(k, 0.0) + v / cfg.num_iterations
                grad_norm = apply_gradients(scorer, opt, cfg.max_grad_norm)  # clip and step, unless not finite
                if not torch.isfinite(grad_norm):  # the same on every rank (after the all-reduce): all skipped it
                    agg["nonfinite/skipped"] += 1.0
                    continue
                if hasattr(policy, "update_expert_bias"):  # DeepSeek-V3 aux-loss-free balancing, global loads
                    agg.update(expert_bias_step(policy))  # moe/load_max_over_mean[/layer]
            sched.step()
            if hasattr(policy, "routing_stats"):  # router entropy; replay: share of tokens routed differently
                agg.update(policy.routing_stats())
            nonfinite = nonfinite + 1 if agg["nonfinite/skipped"] else 0
            if nonfinite >= cfg.max_nonfinite_steps:
                raise FloatingPointError(f"grpo step {step + 1}: the gradient was not finite in {nonfinite} steps in "
                                         f"a row (updates skipped); lower learning_rate or check the rewards")
            if ref is not None and cfg.ref_reset_every and (step + 1) % cfg.ref_reset_every == 0:
                copy_weights(ref.lm, policy)  # R1: the reference becomes the current policy (shard by shard)
            timers["time/update"] = time.perf_counter() - t_update
            # 4. push the new weights to the sampler (a no-op for the native engine, which shares them, unless it
            # holds a copy in runtime.sampler_dtype)
            t_sync = time.perf_counter()
            if cfg.rollout != "server":  # a server on other devices never sleeps
                worker.wake()
            worker.update_weights(policy)  # the module: parameters plus persistent buffers (MoE router bias)
            t_sync = time.perf_counter() - t_sync
            if getattr(worker, "last_sync_bytes", 0):  # a separate engine (vLLM): what the push moved, how fast
                timers["rollout/weight_sync_mb_s"] = worker.last_sync_mb_s
            lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float)
            # FLOPs of this rank's step (2N per token forward, 6N forward + backward): sampling (each group's prompt
            # once, then its completions), the reference and old passes, the update(s)
            seq = float(batch["attention_mask"].sum())
            sampled = float(lengths.sum()) + sum(len(prompt_ids[i]) for i in idx)  # idx: one row per group
            step_flops = n_active * (2 * sampled + 2 * seq * ((cfg.beta > 0) + (cfg.num_iterations > 1))
                                     + 6 * seq * cfg.num_iterations)
            std_per_group = rewards_t.view(-1, G).std(dim=1)
            metrics = {"step": step + 1, "reward": rewards_t.mean().item(), "reward_std": std_per_group.mean().item(),
                       "frac_reward_zero_std": (std_per_group < 1e-6).float().mean().item(),
                       **reward_lib.RewardSet.metrics(per), **agg, **ds_metrics, "grad_norm": grad_norm.item(), "learning_rate": sched.get_last_lr()[0],
                       "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                       "completions/max_length": lengths.max().item(),
                       "completions/clipped_ratio": sum(c.finish_reason == "length" for c in comps) / B,
                       "time/generate": t_gen, **timers, "time/weight_sync": t_sync, "time/step": time.perf_counter() - t0,
                       "compute/step_flops": step_flops}
            metrics = {**reduce_metrics(metrics, world), "step": step + 1, "num_processes": world}
            spent["flops"] += metrics.pop("compute/step_flops") * world
            spent["seconds"] += metrics["time/step"]
            metrics["compute/flops"], metrics["compute/seconds"] = spent["flops"], spent["seconds"]
            log.log(metrics, step + 1)
            if cfg.sample_table_every and (step + 1) % cfg.sample_table_every == 0:
                log.table("samples", ["prompt", "completion", "reward"],
                          [[prompts[idx[c.prompt_index]], c.text, r] for c, r in zip(comps[:8], totals[:8])], step + 1)
            fmt = metrics.get("rewards/format/mean", float("nan"))
            if main:
                bar.update(task, advance=1, info=f"reward {metrics['reward']:.3f} format {fmt:.2f} len {metrics['completions/mean_length']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                check_replicas(policy, world, "GRPO")
                state = {"step": step + 1, "cursor": cursor, "compute": dict(spent)}
                if ref is not None and cfg.ref_reset_every:
                    state["reference"] = full_state_dict(ref.lm, rank0_only=True)  # every rank: it may gather
                checkpoint.save(last, policy, tok, state, opt, sched, scorer)  # every rank: rank 0 writes
    check_replicas(policy, world, "GRPO")
    final = out_dir / "final"
    checkpoint.save(final, policy, tok, wrapped=scorer)  # every rank: FSDP2 gathers the full weights to rank 0
    barrier(world)  # no rank returns before the checkpoint is in place
    if hasattr(worker, "close"):
        worker.close()
    return final
