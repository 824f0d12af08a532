"""Atomic checkpoints: an HF directory (config, safetensors, tokenizer) plus trainer_state/ for exact resume; a LoRA
model's checkpoint holds its merged weights (what vLLM and the next stage load) and the adapter in adapter/.

Everything is written into a temporary sibling directory and renamed into place, so a crash or kill leaves
either the previous checkpoint or the new one, never half of one.

Multi-process: every rank calls save(); rank 0 writes. Under FSDP2 and DeepSpeed ZeRO the HF weights are the full
consolidated ones (gathered to rank 0's CPU, one layer at a time under ZeRO-3) and trainer_state/ also holds one file
per rank, rank{r}.pt: that rank's optimizer shard (FSDP2) and RNG; under ZeRO, trainer_state/deepspeed/ is the
engine's own checkpoint (its optimizer partitions). load_shard restores them after sharding, so a resumed run
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch


def atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _dist() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def save(final: Path, model, tokenizer, state: dict | None = None, optimizer=None, scheduler=None,
         wrapped=None) -> Path:
    """HF checkpoint at `final`; with `state`, also trainer_state/ (optimizer, scheduler, RNG, step, cursor).
    Call it on every rank: rank 0 writes; under FSDP2 or DeepSpeed (`wrapped`, the engine) every rank first joins
    the weight gather and stages its optimizer shard, which rank 0 moves into trainer_state/ before the rename."""
    from grpo.accel import full_state_dict, is_deepspeed, is_fsdp2, zero3

    rank, world = _dist()
    ds = world > 1 and is_deepspeed(wrapped)
    sharded = world > 1 and (is_fsdp2(model) or ds)
    if not sharded and rank != 0:
        return Path(final)
    full = None  # the consolidated weights, where `model`'s own parameters are shards (collectives; rank 0 gets them)
    if sharded and not ds:
        full = full_state_dict(model, rank0_only=True)
    elif ds and zero3(wrapped):
        lora = hasattr(model, "get_base_model")  # the engine holds the peft model's base (TokenLogprobs.lm)
        inner = model.get_base_model() if lora else model
        prefix = next(n for n, m in wrapped.module.named_modules() if m is inner) + "."
        full = {("base_model.model." if lora else "") + k[len(prefix):]: v
                for k, v in (wrapped._zero3_consolidated_16bit_state_dict() or {}).items()}
    staged = Path(final).parent / f".{Path(final).name}.rank{rank}.pt"
    staged_ds = Path(final).parent / f".{Path(final).name}.deepspeed"
    if sharded and state is not None:
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        if ds:  # every rank writes its ZeRO partitions into one directory
            wrapped.save_checkpoint(str(staged_ds), tag="zero", client_state={}, save_latest=False)
        torch.save(_shard_state(None if ds else optimizer), staged.with_suffix(".tmp"))
        os.replace(staged.with_suffix(".tmp"), staged)
    if sharded:
        import torch.distributed as dist

        dist.barrier()  # every shard is staged before rank 0 moves them into the new checkpoint
        if rank != 0:
            return Path(final)
        if full is not None and hasattr(model, "merge_and_unload"):  # LoRA: save an unsharded copy as below
            model, full = _whole_peft(model, full), None
        seen: set[int] = set()  # tied weights (embedding = head) gathered under each name: keep the first, as HF does
        for k, v in model.state_dict(keep_vars=True).items():
            if id(v) in seen and full is not None:
                full.pop(k, None)
            seen.add(id(v))

    def write(tmp: Path):
        if hasattr(model, "merge_and_unload"):  # peft LoRA: adapter/ (peft loads it) + the merged full model
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            merged = copy.deepcopy(model).merge_and_unload()  # the trained model keeps its adapter unmerged
            merged.save_pretrained(tmp, safe_serialization=True)
            del merged
        else:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": full} if full is not None else {}))
        tokenizer.save_pretrained(tmp)
        if state is not None:
            ts = tmp / "trainer_state"
            ts.mkdir()
            torch.save({
                "state": state,
                "optimizer": optimizer.state_dict() if optimizer and not sharded else None,
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
                "world_size": world if sharded else None,
            }, ts / "state.pt")
            for r in range(world if sharded else 0):
                os.replace(staged.with_name(f".{Path(final).name}.rank{r}.pt"), ts / f"rank{r}.pt")
            if ds:
                os.replace(staged_ds, ts / "deepspeed")

    return atomic_dir(final, write)


def _whole_peft(model, full: dict):
    """A whole CPU copy of a sharded peft model (FSDP2 or ZeRO-3) from its gathered state dict, on rank 0, so that
    its adapter and merged weights are saved by peft's own code, as in one process. Built on the meta device and
    filled by assignment: no second initialisation of the weights."""
    from peft import get_peft_model

    base = model.get_base_model()
    name = model.active_adapter
    with torch.device("meta"):
        whole = get_peft_model(type(base)(copy.deepcopy(base.config)), copy.deepcopy(model.peft_config[name]),
                               adapter_name=name)
    missing, unexpected = whole.load_state_dict(full, strict=False, assign=True)
    whole.get_base_model().tie_weights()  # a tied head was gathered under the embedding's name alone
    left = [n for n, p in whole.named_parameters() if p.is_meta]
    if unexpected or left:
        raise RuntimeError(f"LoRA checkpoint: gathered weights do not fit the model (unexpected {unexpected[:3]}, "
                           f"missing {left[:3]})")
    return whole.eval()


def _shard_state(optimizer) -> dict:
    """This rank's optimizer state with DTensors as their local shards, plus its RNG (torch, Python, numpy)."""
    sd = optimizer.state_dict() if optimizer is not None else None
    if sd is not None:
        sd["state"] = {k: {n: v.to_local() if hasattr(v, "to_local") else v for n, v in st.items()}
                       for k, st in sd["state"].items()}
    return {"optimizer": sd,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}}


def load_shard(path: Path, optimizer, wrapped=None) -> bool:
    """Under FSDP2 or DeepSpeed (`wrapped`, the engine), after sharding: restore this rank's optimizer shard and RNG
    from `path`/trainer_state/rank{r}.pt (and the engine's deepspeed/ checkpoint); False when the checkpoint has no
    per-rank files (a one-process or DDP checkpoint)."""
    from torch.distributed.tensor import DTensor

    from grpo.accel import is_deepspeed

    rank, world = _dist()
    ts = Path(path) / "trainer_state"
    f = ts / f"rank{rank}.pt"
    ds = is_deepspeed(wrapped)
    if (ts / "deepspeed").is_dir() and not ds:
        raise ValueError(f"{path}: a DeepSpeed checkpoint (trainer_state/deepspeed) resumes only under "
                         f"runtime.distributed: deepspeed")
    if ds and not (ts / "deepspeed").is_dir():
        raise ValueError(f"{path}: runtime.distributed: deepspeed cannot resume a checkpoint saved without it; "
                         f"resume with the distributed setting it was saved with")
    if not f.is_file():
        return False
    saved = torch.load(ts / "state.pt", weights_only=False).get("world_size")
    if saved != world:
        raise ValueError(f"{path}: a sharded checkpoint of {saved} processes cannot resume on {world}")
    if ds:
        wrapped.load_checkpoint(str(ts / "deepspeed"), tag="zero", load_optimizer_states=True,
                                load_lr_scheduler_states=False)
    elif optimizer is not None and not any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"{path}: an FSDP2 checkpoint (per-rank optimizer shards) resumes only under "
                         f"runtime.distributed: fsdp2")
    blob = torch.load(f, weights_only=False)
    if optimizer is not None and blob["optimizer"] is not None and not ds:
        optimizer.load_state_dict(blob["optimizer"])
        for group in optimizer.param_groups:  # local shards back into DTensors shaped like their parameters
            for p in group["params"]:
                for n, v in optimizer.state.get(p, {}).items():
                    if isinstance(p, DTensor) and not isinstance(v, DTensor) and v.dim() > 0:
                        optimizer.state[p][n] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                                   shape=p.shape, stride=p.stride())
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    np.random.set_state(blob["rng"]["numpy"])
    return True


def load_state(path: Path, optimizer=None, scheduler=None) -> dict | None:
    """Restore optimizer/scheduler/RNG from `path`/trainer_state; returns the saved `state` dict or None."""
    f = Path(path) / "trainer_state" / "state.pt"
    if not f.is_file():
        return None
    blob = torch.load(f, weights_only=False)
    if optimizer is not None and blob["optimizer"]:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"]:
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    np.random.set_state(blob["rng"]["numpy"])
    return blob["state"]
