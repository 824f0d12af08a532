"""Atomic checkpoints: an HF directory (config, safetensors, tokenizer) plus trainer_state/ for exact resume; a LoRA
model's checkpoint holds its merged weights (what vLLM and the next stage load) and the adapter in adapter/.

Everything is written into a temporary sibling directory and renamed into place, so a crash or kill leaves
either the previous checkpoint or the new one, never half of one.
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


def save(final: Path, model, tokenizer, state: dict | None = None, optimizer=None, scheduler=None) -> Path:
    """HF checkpoint at `final`; with `state`, also trainer_state/ (optimizer, scheduler, RNG, step, cursor)."""

    def write(tmp: Path):
        if hasattr(model, "merge_and_unload"):  # peft LoRA: adapter/ (peft loads it) + the merged full model
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            merged = copy.deepcopy(model).merge_and_unload()  # the trained model keeps its adapter unmerged
            merged.save_pretrained(tmp, safe_serialization=True)
            del merged
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            ts = tmp / "trainer_state"
            ts.mkdir()
            torch.save({
                "state": state,
                "optimizer": optimizer.state_dict() if optimizer else None,
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            }, ts / "state.pt")

    return atomic_dir(final, write)


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
