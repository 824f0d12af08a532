"""Run by tests/test_deepspeed.py under `torchrun --nproc_per_node 2`: the same SFT runs under DDP, DeepSpeed ZeRO-2
and ZeRO-3, the same GRPO runs (full and LoRA) under DDP, ZeRO-2 and ZeRO-3, a ZeRO-3 SFT and a ZeRO-2 GRPO resume, and what each rank holds
under ZeRO; the test compares the checkpoints this writes.

usage: torchrun --nproc_per_node 2 tests/deepspeed_script.py BASE_CHECKPOINT OUT_DIR
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from grpo import accel, sft, trainer
from grpo.config import RuntimeConfig
from grpo.logprobs import TokenLogprobs
from grpo.models import hf
from tests.fsdp_script import grpo_config, logged, lora_grpo, lora_push, sft_config

# ZeRO-3 partitions every parameter (DeepSpeed keeps ones under 1e5 elements whole by default: all of this model's)
RUNS = {"ddp": ("ddp", {}), "zero2": ("deepspeed", {"zero_stage": 2}),
        "zero3": ("deepspeed", {"zero_stage": 3, "zero3_param_persistence_threshold": 0})}


def sft_run(kind: str):
    """SFT with a 2-step warmup (so the engine must follow r1kit's schedule) under RUNS[kind]."""
    distributed, fields = RUNS[kind]
    return sft_config(distributed, warmup_steps=2, **fields)


def copy_last(src: Path, dst: Path) -> None:
    """A fresh run directory holding only src's step-2 checkpoint (rank 0 copies, every rank waits)."""
    if dist.get_rank() == 0:
        shutil.copytree(src / "last", dst / "last")
    dist.barrier()


def held(stage: int, base: str) -> dict:
    """Elements this rank holds under ZeRO-`stage` on GRPO's scorer: its fp32 optimizer partition (ZeRO-2, the
    moments are the same size), or its parameter partition (ZeRO-3)."""
    model, _ = hf.load(base)
    module = TokenLogprobs(model)
    opt, _ = accel.make_optimizer(model, sft_config("deepspeed"), 1)
    engine, _, _, _ = accel.distributed(module, opt, RuntimeConfig(distributed="deepspeed", zero_stage=stage,
                                                                   zero3_param_persistence_threshold=0))
    if stage == 2:
        local = sum(p.numel() for p in engine.optimizer.single_partition_of_fp32_groups)
    else:  # the partition, and no whole copy beside it
        assert all(p.data.numel() == 0 for p in module.parameters()), "a ZeRO-3 parameter stayed whole"
        local = sum(p.ds_tensor.numel() for p in module.parameters())
    return {"local": local, "total": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}


def main(base: str, out: Path) -> None:
    quiet = Console(quiet=True)
    sft.train(sft_run("ddp"), base, out / "sft_ddp", quiet)
    trainer.train(grpo_config(base, "ddp"), base, out / "grpo_ddp", quiet)
    for kind in ("zero2", "zero3"):
        sft.train(sft_run(kind), base, out / f"sft_{kind}", quiet)
    copy_last(out / "sft_zero3", out / "sft_resumed")
    sft.train(sft_run("zero3"), base, out / "sft_resumed", quiet)
    logged(trainer.train, grpo_config(base, "deepspeed", "grpo.runtime.zero_stage=2"), base, out / "grpo_zero2")
    logged(trainer.train, grpo_config(base, "deepspeed", "grpo.runtime.zero_stage=3",
                                      "grpo.runtime.zero3_param_persistence_threshold=0"), base, out / "grpo_zero3")
    # LoRA GRPO under DDP and ZeRO-2/3 (ZeRO-3: its checkpoint written from an unsharded copy on rank 0)
    trainer.train(lora_grpo(base, "ddp"), base, out / "grpo_lora_ddp", quiet)
    trainer.train(lora_grpo(base, "deepspeed", "grpo.runtime.zero_stage=2"), base, out / "grpo_lora_zero2", quiet)
    trainer.train(lora_grpo(base, "deepspeed", "grpo.runtime.zero_stage=3",
                            "grpo.runtime.zero3_param_persistence_threshold=0"), base, out / "grpo_lora_zero3", quiet)
    lora_push(base, out, RuntimeConfig(distributed="deepspeed", zero_stage=3, zero3_param_persistence_threshold=0))
    copy_last(out / "grpo_zero2", out / "grpo_resumed")
    trainer.train(grpo_config(base, "deepspeed", "grpo.runtime.zero_stage=2"), base, out / "grpo_resumed", quiet)
    counts = {}
    for stage in (2, 3):
        mine = held(stage, base)
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, mine["local"])
        counts[f"zero{stage}"] = {"local": seen, "total": mine["total"]}
    if dist.get_rank() == 0:
        (out / "counts.json").write_text(json.dumps(counts))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
