"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: the same SFT and GRPO runs under DDP and FSDP2, an
FSDP2 SFT and GRPO resume, distill kd and on_policy under DDP and FSDP2, DDP and FSDP2 SFT of r1kit's MoE model, a 2-rank reject,
LoRA GRPO under DDP and FSDP2 (and its resume and vLLM weight stream), a 2-rank eval, and FSDP2's per-rank
parameter counts; the test compares
the checkpoints this writes.

usage: torchrun --nproc_per_node 2 tests/fsdp_script.py BASE_CHECKPOINT OUT_DIR STUDENT_CHECKPOINT MOE_CHECKPOINT
"""

import copy
import io
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from grpo import accel, distill, evaluate, reject, sft, trainer
from grpo.config import DistillConfig, EvalConfig, RejectConfig, RuntimeConfig, SFTConfig, load_stage
from grpo.logprobs import TokenLogprobs
from grpo.models import hf


def sft_config(kind: str, steps: int = 4, **fields) -> SFTConfig:
    """A few SFT steps on the synthetic arithmetic task, global batch 8 (4 per rank), a checkpoint and a held-out
    loss every 2 steps; `fields` go to the config (say warmup_steps) or, for zero_* keys, to its runtime."""
    runtime = {"distributed": kind, **{k: fields.pop(k) for k in list(fields) if k.startswith("zero")}}
    return SFTConfig.model_validate({"data": {"num_examples": 64}, "template": "r1_zero", "steps": steps, "batch_size": 8,
                                     "learning_rate": 1e-3, "save_every": 2, "eval_fraction": 0.1, "eval_every": 2,
                                     "runtime": runtime, **fields})


def grpo_config(base: str, kind: str, *extra: str):
    """The DDP test's GRPO run (tests/test_grpo_ddp.py), with a KL reference (beta 0.04) and a reference reset;
    `extra`: more overrides."""
    overrides = [f"grpo.model={base}", "grpo.data.num_examples=32", "grpo.group_size=4", "grpo.prompts_per_step=4",
                 "grpo.steps=3", "grpo.save_every=2", "grpo.sampling.max_tokens=12", "grpo.learning_rate=1e-3",
                 "grpo.micro_batch_size=3", "grpo.ref_reset_every=2", f"grpo.runtime.distributed={kind}",
                 "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tests.helpers:length_reward'}]", *extra]
    return load_stage("grpo", "recipes/r1-zero-tiny.yaml", overrides)[0]


def lora_grpo(base: str, kind: str, *extra: str):
    """grpo_config with a LoRA adapter (r 4) instead of full training, and no reference reset (the reference is the
    adapter switched off)."""
    return grpo_config(base, kind, "grpo.ref_reset_every=0", "grpo.runtime.lora={r: 4, alpha: 8}", *extra)


def lora_push(base: str, out: Path, rt: RuntimeConfig | None = None, name: str = "lora_push") -> None:
    """The vLLM weight stream of a LoRA model sharded by `rt` (FSDP2 by default: every rank gathers, the adapter's
    delta computed from DTensor shards; ZeRO-3: inside a gather of each layer's partitions) against the same
    model's unsharded stream; rank 0 writes the comparison to `name`.json."""
    from grpo.config import LoRAConfig
    from grpo.rollout.vllm import sync_tensors

    model, _ = hf.load(base)
    peft = accel.add_lora(model, LoRAConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # a nonzero adapter (a fresh one's B is 0, its delta nothing)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    whole = {n: t.clone() for n, t in sync_tensors(copy.deepcopy(peft))}
    rt = rt or RuntimeConfig(distributed="fsdp2")
    opt = accel.make_optimizer(peft, sft_config(rt.distributed), 1)[0] if rt.distributed == "deepspeed" else None
    accel.distributed(TokenLogprobs(peft), opt, rt)
    pushed = {n: t.clone() for n, t in sync_tensors(peft)}
    sharded = accel.is_fsdp2(peft) or all(p.data.numel() == 0 for p in peft.parameters())  # ZeRO-3: partitions only
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps({
            "same_names": sorted(pushed) == sorted(whole), "n": len(whole), "sharded": sharded,
            "max_abs": max(float((pushed[n] - whole[n]).abs().max()) for n in whole),
            "delta": max(float((whole[n] - w).abs().max()) for n, w in hf.load(base)[0].state_dict().items()
                         if n in whole)}))
    dist.barrier()


def distill_config(teacher: str, student: str, kind: str) -> DistillConfig:
    """kd (forward KL) from `teacher` into `student`, global batch 8 (4 per rank), 3 steps, under `kind`."""
    return DistillConfig(mode="kd", teacher=teacher, model=student, steps=3, batch_size=8, max_length=96,
                         learning_rate=3e-3, chunk_size=64, data={"source": "synthetic:arith", "num_examples": 16},
                         runtime={"distributed": kind})


def on_policy_config(teacher: str, student: str, kind: str, loss: str) -> DistillConfig:
    """on_policy distillation (`loss`: advantage or jsd) from `teacher` into `student`: 4 prompts x 2 samples of up
    to 12 tokens a step (2 prompts per rank), 3 steps, under `kind`."""
    return DistillConfig(mode="on_policy", on_policy_loss=loss, teacher=teacher, model=student, steps=3,
                         prompts_per_step=4, group_size=2, sampling={"temperature": 1.0, "max_tokens": 12},
                         learning_rate=1e-3, chunk_size=64, data={"source": "synthetic:arith", "num_examples": 16},
                         runtime={"distributed": kind})


def eval_config() -> EvalConfig:
    """Two benchmarks of 5 and 3 problems (an uneven split over 2 ranks), 3 samples each, temperature 1."""
    return EvalConfig.model_validate({
        "benchmarks": {"arith": {"num_examples": 5, "split": "test"}, "more": {"num_examples": 3, "split": "train"}},
        "k": 3, "pass_at": [1, 2], "sampling": {"temperature": 1.0, "max_tokens": 16}})


def eval_samples(base: str, rank: int, world: int) -> list:
    """(prompt index, token ids) of eval's k=3 samples of 5 prompts, split over `world` ranks as eval splits them."""
    from grpo.rollout import SamplingParams, make_worker

    model, tok = hf.load(base)
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(5)]
    comps = evaluate._sample_share(make_worker("native", model, tok, base), prompts, 3,
                                   SamplingParams(temperature=1.0, max_tokens=12, seed=3), rank, world)
    return [(c.prompt_index, c.token_ids) for c in comps]


def reject_config(base: str) -> RejectConfig:
    """Rejection sampling of `base`: 8 prompts x 4 samples in 4 shards of 2 prompts, keeping completions of about
    20 characters (an untrained model meets that some of the time)."""
    return RejectConfig(model=base, data={"num_examples": 8}, samples_per_prompt=4, shard_size=2,
                        sampling={"temperature": 1.0, "max_tokens": 24, "stop": ["."]},
                        rewards=[{"name": "tests.helpers:length_reward"}], keep={"length_reward": -0.5},
                        filters={"mixed_language": False})


def logged(train, cfg, base: str, run: Path) -> None:
    """A stage's train(cfg, base, run, console), with what rank 0 prints saved to run/console.txt (the line naming
    the sharding)."""
    console = Console(file=io.StringIO(), width=400)
    train(cfg, base, run, console)
    if dist.get_rank() == 0:
        (run / "console.txt").write_text(console.file.getvalue())


def sharded_at_update(train, cfg, base: str, run: Path) -> None:
    """logged(), recording at every grad-enabled scorer forward (the policy update) whether the first decoder layer
    is sharded again, i.e. the native sampler's whole-model gather was released after sampling; saved per rank."""
    from torch.distributed.tensor import DTensor

    seen = []

    def hook(module, args):
        if isinstance(module, TokenLogprobs) and torch.is_grad_enabled():
            seen.append(isinstance(next(accel.decoder_layers(module)[0].parameters()), DTensor))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        logged(train, cfg, base, run)
    finally:
        handle.remove()
    (run / f"sharded_at_update_rank{dist.get_rank()}.json").write_text(json.dumps(seen))


def main(base: str, out: Path, student: str, moe: str) -> None:
    quiet = Console(quiet=True)
    for kind in ("ddp", "fsdp2"):
        sft.train(sft_config(kind), base, out / f"sft_{kind}", quiet)
    rank = int(torch.distributed.get_rank())
    # resume: a fresh run directory holding only the FSDP2 run's step-2 checkpoint continues to step 4
    if rank == 0:
        shutil.copytree(out / "sft_fsdp2" / "last", out / "sft_resumed" / "last")
    dist.barrier()
    assert sorted(p.name for p in (out / "sft_resumed" / "last" / "trainer_state").iterdir()) == \
        ["rank0.pt", "rank1.pt", "state.pt"]
    sft.train(sft_config("fsdp2"), base, out / "sft_resumed", quiet)
    trainer.train(grpo_config(base, "ddp"), base, out / "grpo_ddp", quiet)
    sharded_at_update(trainer.train, grpo_config(base, "fsdp2"), base, out / "grpo_fsdp2")
    if rank == 0:  # GRPO too: step 3 again from the FSDP2 run's step-2 checkpoint (reference reset at step 2)
        shutil.copytree(out / "grpo_fsdp2" / "last", out / "grpo_resumed" / "last")
    dist.barrier()
    trainer.train(grpo_config(base, "fsdp2"), base, out / "grpo_resumed", quiet)
    # distill kd from the base into a smaller student, under DDP and FSDP2 (the teacher sharded too)
    distill.train(distill_config(base, student, "ddp"), student, out / "distill_ddp", quiet)
    logged(distill.train, distill_config(base, student, "fsdp2"), student, out / "distill_fsdp2")
    # on_policy distillation (both losses) under DDP and FSDP2: each rank samples its share of the prompts
    for loss in ("advantage", "jsd"):
        for kind in ("ddp", "fsdp2"):
            distill.train(on_policy_config(base, student, kind, loss), student, out / f"on_policy_{loss}_{kind}", quiet)
    # r1kit's DeepSeek MoE model under DDP: its expert-bias update must use the global batch's token loads
    for kind in ("ddp", "fsdp2"):
        sft.train(sft_config(kind), moe, out / f"sft_moe_{kind}", quiet)
    # rejection sampling: the two ranks share its shards, rank 0 assembles them
    reject.run(reject_config(base), base, out / "reject", quiet)
    # eval: the two ranks split every benchmark's problems, rank 0 writes
    evaluate.run(eval_config(), base, out / "eval", quiet)
    samples = eval_samples(base, rank, dist.get_world_size())
    if rank == 0:
        (out / "eval_samples.json").write_text(json.dumps(samples))
    # LoRA GRPO under DDP and FSDP2, an FSDP2 LoRA resume, and the sharded LoRA model's vLLM weight stream
    for kind in ("ddp", "fsdp2"):
        trainer.train(lora_grpo(base, kind), base, out / f"grpo_lora_{kind}", quiet)
    if rank == 0:
        shutil.copytree(out / "grpo_lora_fsdp2" / "last", out / "grpo_lora_resumed" / "last")
    dist.barrier()
    trainer.train(lora_grpo(base, "fsdp2"), base, out / "grpo_lora_resumed", quiet)
    lora_push(base, out)
    # per-rank parameter elements under FSDP2, on the scorer GRPO shards
    model, _ = hf.load(base)
    scorer, _, rank, world = accel.distributed(TokenLogprobs(model), None, RuntimeConfig(distributed="fsdp2"))
    local = sum(p.to_local().numel() for p in scorer.parameters())
    total = sum(p.numel() for p in scorer.parameters())
    counts = [None] * world
    dist.all_gather_object(counts, local)
    if rank == 0:
        (out / "counts.json").write_text(json.dumps({"world": world, "total": total, "local": counts}))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
