"""`r1 run <gpu recipe> --dry-run`: each recipe for a real model is validated, runs one step per stage on CPU
stand-ins of the same architecture, and prints a memory plan whose parameter counts are the real models'."""

from __future__ import annotations

import pytest
import torch

from grpo import accel, cli
from grpo.config import ConfigError, LoRAConfig, load_recipe
from grpo.plan import GiB, _build, check_split, memory_plan, real_config, shapes

GPU_RECIPES = ["gpu/r1-zero-qwen2.5-math-1.5b", "gpu/grpo-deepseek-v2-lite", "gpu/distill-r1-traces-qwen2.5-1.5b"]


def test_parameter_counts_are_the_published_ones():
    """Counted on the meta device from the shipped configs: Qwen2.5-1.5B has 1.54B parameters, 1.31B without
    the (tied) embedding, as its model card says; DeepSeek-V2-Lite 15.7B total and about 2.4B active per token."""
    q = shapes("Qwen/Qwen2.5-1.5B")
    assert q["params"] == 1_543_714_304 and round((q["params"] - 151936 * 1536) / 1e9, 2) == 1.31
    with torch.device("meta"):
        v2 = _build(real_config("deepseek-ai/DeepSeek-V2-Lite"))
    total = sum(p.numel() for p in v2.parameters())
    assert round(total / 1e9, 1) == 15.7 and 2.1e9 < accel.active_params(v2) < 2.6e9


def test_memory_plan_arithmetic():
    """fp32 training holds 16 bytes a parameter (weights, gradients, two AdamW moments) plus a bf16 reference;
    LoRA trains a sliver, holds no reference copy, and its gradients and moments shrink with it."""
    sec = load_recipe("gpu/r1-zero-qwen2.5-math-1.5b").sections["grpo"]
    n = shapes("Qwen/Qwen2.5-Math-1.5B")["params"]
    plan = dict(memory_plan(sec, "Qwen/Qwen2.5-Math-1.5B"))
    assert plan["weights"] == plan["gradients"] == n * 4 / GiB and plan["AdamW moments"] == 2 * plan["weights"]
    assert plan["reference"] == n * 2 / GiB
    lora = sec.model_copy(update={"runtime": sec.runtime.model_copy(update={"lora": LoRAConfig(r=16)})})
    small = dict(memory_plan(lora, "Qwen/Qwen2.5-Math-1.5B"))
    assert "reference" not in small and small["gradients"] < 0.02 * small["weights"]
    assert small["AdamW moments"] == 2 * small["gradients"]


def test_memory_plan_divides_what_the_configured_sharding_shards():
    """Over 4 GPUs: FSDP2 divides weights, gradients, moments and the reference by 4 and adds the units it gathers
    in flight (embedding/head root + one layer); ZeRO-2 divides all but the weights; DDP divides nothing. A batch
    that does not split over the GPUs is a one-line error naming the field."""
    sec = load_recipe("gpu/r1-zero-qwen2.5-math-1.5b").sections["grpo"]
    s = shapes("Qwen/Qwen2.5-Math-1.5B")
    one = dict(memory_plan(sec, "Qwen/Qwen2.5-Math-1.5B"))

    def over4(distributed: str) -> dict:
        rt = sec.runtime.model_copy(update={"distributed": distributed})
        return {k.split(" (1/")[0]: v for k, v in memory_plan(sec.model_copy(update={"runtime": rt}),
                                                             "Qwen/Qwen2.5-Math-1.5B", gpus=4)}

    fsdp, zero2, ddp = over4("fsdp2"), over4("deepspeed"), over4("ddp")
    for part in ("weights", "gradients", "AdamW moments", "reference"):
        assert fsdp[part] == one[part] / 4 and zero2[part] == (one[part] if part == "weights" else one[part] / 4)
    gathered = fsdp.pop("gathered in flight (embedding/head unit + one layer)")
    # Qwen2.5-Math-1.5B ties its head: the root holds the 151936 x 1536 embedding, a layer 46.8M parameters
    assert s["root"] == 151936 * 1536 + 1536 and 46e6 < s["layer"] < 48e6
    assert gathered == (s["root"] + s["layer"]) * 4 / GiB
    assert ddp == one and set(fsdp) == set(one)
    with pytest.raises(ConfigError, match="grpo.prompts_per_step=32 must divide evenly over --gpus 3"):
        check_split("grpo", sec, 3)


def test_every_gpu_recipe_dry_runs_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in GPU_RECIPES:
        assert cli.main(["run", name, "--dry-run"]) == 0, name
        out = capsys.readouterr().out
        assert "every stage built and ran one step on CPU stand-ins" in " ".join(out.split()), name
        assert "memory per GPU" in out
        assert "total" in out
        assert "timings: {'" in out  # the training stages' seconds and phases, as bench/gpu_check.sh quotes them
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing where the real run would


def test_full_size_stand_in_has_the_real_shapes(tmp_path):
    """--full-size (for GPU checks) builds the real architecture with random weights: the same parameter count and
    vocabulary as the checkpoint it stands in for, whatever the local tokenizer's size."""
    from grpo.data.tokenizer import train_bpe
    from grpo.models import hf
    from grpo.plan import _stand_in
    from tests.helpers import tiny_checkpoint

    real = tiny_checkpoint(tmp_path / "real")
    train_bpe(["1 + 2 = 3", "4 + 5 = 9"] * 20, 300).save_pretrained(str(tmp_path / "tok"))
    full, _ = hf.load(_stand_in(str(real), tmp_path / "full", tmp_path / "tok", full_size=True))
    tiny, _ = hf.load(_stand_in(str(real), tmp_path / "tiny", tmp_path / "tok"))
    want, _ = hf.load(str(real))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full) == count(want) and full.config.vocab_size == want.config.vocab_size
    assert count(tiny) != count(want)


def test_device_flags_are_for_dry_runs_only(capsys):
    assert cli.main(["run", "r1-zero-tiny", "--device", "cuda"]) == 2
    assert "--device/--full-size/--gpus: only for --dry-run" in capsys.readouterr().err


def test_gpu_check_covers_every_gpu_recipe_and_refuses_a_cpu(tmp_path):
    """bench/gpu_check.sh names every recipe in recipes/gpu/ (one step of each stage on CUDA) and, where torch sees
    no GPU, stops at once with one line saying so rather than running CPU stand-ins."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = (repo / "bench" / "gpu_check.sh").read_text()
    assert {p.name for p in (repo / "recipes" / "gpu").glob("*.yaml")} <= {
        w.rpartition("/")[2].rstrip(";") for w in script.split() if w.startswith("recipes/gpu/")}
    r = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr, r.stderr[-500:]
