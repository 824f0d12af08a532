"""`r1 run RECIPE --dry-run`: check a recipe for real models without the hub or a GPU. Every stage is validated,
then run for one step on CPU with a tiny stand-in of the same architecture (a locally trained tokenizer, data from
the hub replaced by synthetic rows), and a memory plan per GPU is printed for the real model as configured.

The plan counts parameters exactly, on the meta device (no memory), for the real config: known hub ids are in
HUB_CONFIGS (config.json values, so no download is needed), a local checkpoint is read from its config.json.
Simplifications: activations follow Korthikanti et al. 2022 (34 s·b·h bytes per layer at 2-byte activations,
attention scores excluded as sdpa/flash never store them; with gradient checkpointing a layer's input, 2 s·b·h,
plus one layer recomputed); AdamW keeps two moments in the parameters' dtype; vLLM's KV cache is what the step
takes the rest of its gpu_memory_utilization share (compared with a step's prompts x G x (512 + max_tokens)
tokens), its weights bf16. With --gpus N (one process per GPU) the parts the stage's runtime.distributed shards
are divided by N: FSDP2 the weights, gradients, moments and GRPO reference, plus the units gathered in flight (the
root: embedding, norm, head; one layer); ZeRO-2 the gradients, moments and reference; ZeRO-3 the weights too; DDP
(auto) and the stages that keep a whole model per rank (reject, eval) nothing; distill's teacher
is sharded as the reference is. vLLM's weights are divided by its tensor-parallel
size (the KV cache's bytes per token are counted whole: a lower bound on its tokens under tensor parallelism).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from grpo.accel import DTYPES, decoder_layers, frozen_dtype
from grpo.config import STAGES, ConfigError, DataConfig, RecipeConfig, stage_runner

# config.json of the models the GPU recipes name (the fields that set shapes), so a dry run needs no hub
HUB_CONFIGS = {
    "Qwen/Qwen2.5-Math-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                                   tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                                                    num_hidden_layers=28, num_attention_heads=28,
                                                    num_key_value_heads=4, vocab_size=152064,
                                                    max_position_embeddings=131072, rope_theta=10000.0,
                                                    tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-V2-Lite": dict(model_type="deepseek_v2", preset="v2_lite"),
}
GiB = 2**30


def real_config(path: str) -> dict:
    """The shape fields of a model: HUB_CONFIGS for known hub ids, else the checkpoint's config.json."""
    if path in HUB_CONFIGS:
        return dict(HUB_CONFIGS[path])
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"--dry-run: {path} is neither a local checkpoint nor a known hub id "
                          f"({', '.join(HUB_CONFIGS)})")
    return json.loads(cfg.read_text())


def _build(cfg: dict, dtype=torch.float32):
    """The model of a config dict: r1kit's DeepSeek model for deepseek types (a preset or config.json fields),
    else the transformers model of that type."""
    from grpo.models import PRESETS, DeepseekConfig, DeepseekForCausalLM

    fields = dict(cfg)
    if fields.get("model_type") in ("deepseek_v2", "deepseek_v3"):
        preset = fields.pop("preset", None)
        return DeepseekForCausalLM(PRESETS[preset]() if preset else DeepseekConfig.from_dict(fields)).to(dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    mt = fields.pop("model_type")
    keep = {k: v for k, v in fields.items() if not isinstance(v, dict) and k not in ("architectures", "torch_dtype")}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **keep), dtype=dtype)


def shapes(path: str, lora=None) -> dict:
    """Exact counts on the meta device: params, trainable (LoRA or all), layers, hidden, KV bytes per token (bf16),
    and the FSDP units gathered in flight: `root` (what is outside the decoder layers) and `layer` (the largest)."""
    cfg = real_config(path)
    with torch.device("meta"):
        model = _build(cfg)
        n = sum(p.numel() for p in model.parameters())
        layer = max(sum(p.numel() for p in m.parameters()) for m in decoder_layers(model))
        root = n - sum(sum(p.numel() for p in m.parameters()) for m in decoder_layers(model))
        trainable = n
        if lora is not None:
            from grpo.accel import add_lora

            trainable = sum(p.numel() for p in add_lora(model, lora).parameters() if p.requires_grad)
    c = model.config
    layers, hidden = c.num_hidden_layers, c.hidden_size
    if getattr(c, "kv_lora_rank", None):  # MLA caches the latent and the rope key
        kv = layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    else:
        head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
        kv = layers * 2 * c.num_key_value_heads * head_dim * 2
    return {"params": n, "trainable": trainable, "layers": layers, "hidden": hidden, "kv_bytes_per_token": kv,
            "root": root, "layer": layer}


def spreads(sec) -> bool:
    """Does runtime.distributed spread this stage's model over the processes? sft, grpo and distill (with mode sft
    it is an SFT run); reject splits its shards and eval its problems, each rank with a whole model."""
    return sec.kind in ("sft", "grpo", "distill")


def memory_plan(sec, model: str, gpu_gib: float = 80.0, gpus: int = 1) -> list[tuple[str, float]]:
    """[(part, GiB per GPU)] for one stage on `model` as configured, over `gpus` processes: a training stage's
    weights, gradients, AdamW moments, reference or teacher and activations; a sampling stage's weights; vLLM's
    weights and KV cache."""
    rt, kind = sec.runtime, sec.kind
    training = kind in ("sft", "grpo", "distill")
    s = shapes(model, rt.lora if training else None)
    b_w = DTYPES[rt.dtype].itemsize
    # what runtime.distributed shards over the gpus (grpo.accel: distributed, shard_frozen); distill runs alone
    how = rt.distributed if gpus > 1 and spreads(sec) else "one"
    w_div = gpus if how == "fsdp2" or (how == "deepspeed" and rt.zero_stage == 3) else 1
    opt_div = gpus if how in ("fsdp2", "deepspeed") else 1
    rows = []
    if training:
        tag = f" (1/{gpus})" if gpus > 1 else ""
        rows += [("weights" + (tag if w_div > 1 else ""), s["params"] * b_w / w_div),
                 ("gradients" + (tag if opt_div > 1 else ""), s["trainable"] * b_w / opt_div),
                 ("AdamW moments" + (tag if opt_div > 1 else ""), 2 * s["trainable"] * b_w / opt_div)]
        if w_div > 1:  # the FSDP2 root stays gathered through forward and backward, plus one layer at a time
            rows.append(("gathered in flight (embedding/head unit + one layer)", (s["root"] + s["layer"]) * b_w))
        if kind == "grpo" and sec.beta > 0 and rt.lora is None:
            ref_div = opt_div if not sec.dynamic_sampling else 1
            rows.append(("reference" + (tag if ref_div > 1 else ""),
                         s["params"] * frozen_dtype(rt).itemsize / ref_div))
        if kind == "distill" and sec.teacher is not None:
            rows.append(("teacher" + (tag if opt_div > 1 else ""),
                         shapes(sec.teacher)["params"] * frozen_dtype(rt).itemsize / opt_div))
        seq, batch = ((512 + sec.sampling.max_tokens, sec.micro_batch_size) if kind == "grpo"
                      else (sec.max_length, sec.batch_size))
        b_act = 4 if rt.dtype == "float32" and rt.mixed_precision == "no" else 2
        sbh = seq * batch * s["hidden"] * b_act / 2  # s*b*h, counted in 2-byte values
        act = (2 * s["layers"] + 34) * sbh if rt.gradient_checkpointing else 34 * s["layers"] * sbh
        rows.append((f"activations ({batch} x {seq} tokens{', checkpointed' if rt.gradient_checkpointing else ''})",
                     act))
    elif getattr(sec, "rollout", "native") == "native":
        rows.append(("weights", s["params"] * b_w))
    if kind in ("grpo", "eval", "reject") and getattr(sec, "rollout", "native") == "native":
        # the native sampler holds the cache of at most max_batch_size (256) rows at full length
        prompts = getattr(sec, "prompts_per_step", None) or 256
        n = getattr(sec, "group_size", None) or getattr(sec, "samples_per_prompt", None) or getattr(sec, "k", 1)
        tokens = min(256, prompts * n) * (512 + sec.sampling.max_tokens)
        rows.append((f"native sampler KV cache ({tokens:,} tokens)", tokens * s["kv_bytes_per_token"] * b_w / 2))
    if getattr(sec, "rollout", None) == "vllm":  # vLLM takes gpu_memory_utilization of the GPU: weights, then KV
        tp = getattr(sec, "vllm_tensor_parallel_size", 1)
        reserve, weights = sec.vllm_gpu_memory_utilization * gpu_gib * GiB, s["params"] * 2 / tp
        prompts = getattr(sec, "prompts_per_step", None) or getattr(sec, "shard_size", None) or 256
        n = getattr(sec, "group_size", None) or getattr(sec, "samples_per_prompt", None) or getattr(sec, "k", 1)
        need = prompts * n * (512 + sec.sampling.max_tokens)  # every sequence of a step (or a shard) at full length
        cap = max(0, int((reserve - weights) // s["kv_bytes_per_token"]))
        rows += [("vLLM weights (bf16" + (f", 1/{tp}: tensor parallel" if tp > 1 else "") + ")", weights),
                 (f"vLLM KV cache, the rest of {sec.vllm_gpu_memory_utilization:.0%} of the GPU: {cap:,} tokens "
                  f"({'enough for' if cap >= need else 'in waves:'} {need:,} in flight at most)",
                  max(0.0, reserve - weights))]
    return [(name, b / GiB) for name, b in rows]


# ---------------------------------------------------------------- the stand-in run


def _stand_in(path: str, out: Path, tok_dir: Path, full_size: bool = False) -> str:
    """A tiny checkpoint of the same architecture as `path` (model type, MLA/MoE routing, tying) on a locally
    trained tokenizer; returns its directory. full_size: a transformers model at its real shape (random weights,
    real vocabulary size), so a GPU check moves real-sized weights; r1kit's DeepSeek models stay tiny."""
    from grpo.models import hf

    cfg = real_config(path)
    tok = hf.load_tokenizer(str(tok_dir))
    if full_size and cfg.get("model_type") not in ("deepseek_v2", "deepseek_v3"):
        model = _build(cfg, torch.bfloat16)  # bf16 on disk: each stage loads it in its runtime.dtype
        model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    elif cfg.get("model_type") in ("deepseek_v2", "deepseek_v3"):
        from grpo.models import PRESETS

        ref = PRESETS[cfg["preset"]]() if cfg.get("preset") else None
        small = {"preset": "tiny", "num_hidden_layers": 2, "num_nextn_predict_layers": 0}
        if ref is not None:  # keep the router's kind (V2: softmax greedy; V3: sigmoid, bias, groups)
            small.update(topk_method=ref.topk_method, scoring_func=ref.scoring_func, n_group=1, topk_group=1,
                         norm_topk_prob=ref.norm_topk_prob, q_lora_rank=ref.q_lora_rank)
        model = hf.build_from_config(small, len(tok), tok.pad_token_id, tok.eos_token_id)
    else:
        heads = 2
        kv = 1 if cfg.get("num_key_value_heads", heads) < cfg.get("num_attention_heads", heads) else heads
        small = {"model_type": cfg["model_type"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 32,
                 "max_position_embeddings": 512, "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
        model = hf.build_from_config(small, len(tok), tok.pad_token_id, tok.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def _shrunk(sec, models: dict[str, str], device: str = "cpu"):
    """The section for a one-step run: stand-in models, synthetic data in place of the hub, a handful of rows and
    tokens; on CPU fp32 with native sampling, on CUDA the recipe's own precision and sampler (vLLM included)."""
    on_cpu = device == "cpu"
    run = {"device": "cpu", "dtype": "float32", "mixed_precision": "no", "reference_dtype": "same",
           "sampler_dtype": "same"} if on_cpu \
        else {"device": device}
    update: dict = {"runtime": sec.runtime.model_copy(update=run)}
    if getattr(sec, "template", None) == "chat":  # the stand-ins' local tokenizer has no chat template
        update["template"] = "r1_zero"
    for field in ("model", "teacher", "tokenizer"):
        if getattr(sec, field, None) in models:
            update[field] = models[getattr(sec, field)]
    data = getattr(sec, "data", None)
    if isinstance(data, DataConfig) and not Path(data.source).is_file() and not data.source.startswith("stage:"):
        update["data"] = DataConfig(source="synthetic:arith", split=data.split if data.split in ("train", "test")
                                    else "train", num_examples=16,
                                    completion_column="solution" if data.completion_column else None)
    if sec.kind == "eval":
        update["benchmarks"] = {b: DataConfig(source="synthetic:arith", split="test", num_examples=4)
                                for b in sec.benchmarks}
    small = {"steps": 1, "epochs": None, "batch_size": 4, "micro_batch_size": 4, "prompts_per_step": 2,
             "group_size": 2, "samples_per_prompt": 2, "k": 2, "save_every": 0, "eval_every": 0, "max_length": 128,
             "dynamic_sampling": None, **({"rollout": "native"} if on_cpu else {})}
    fields = type(sec).model_fields
    update.update({k: v for k, v in small.items() if k in fields})
    if "sampling" in fields:
        update["sampling"] = sec.sampling.model_copy(update={"max_tokens": 8})
    if "pass_at" in fields:
        update["pass_at"] = [1, 2]
    if sec.kind == "reject":  # an untrained stand-in passes no keep rule: keep what it samples
        update.update(keep={r.label or r.name.rpartition(":")[2]: -1e9 for r in sec.rewards}, dedup_threshold=None,
                      decontaminate=[], filters=sec.filters.model_copy(update={"truncated": False,
                                                                                "mixed_language": False}))
    return sec.model_copy(update=update)


def check_split(name: str, sec, gpus: int) -> None:
    """The batch fields a run over `gpus` processes splits must divide evenly (the stages' own checks, made before
    any GPU is taken): GRPO's prompts_per_step and vLLM tensor-parallel size, SFT's batch_size."""
    fields = ("prompts_per_step", "batch_size")
    if sec.kind == "distill":  # kd splits its batch, on_policy its prompts
        fields = ("prompts_per_step",) if sec.mode == "on_policy" else ("batch_size",)
    for field in fields:
        if spreads(sec) and hasattr(sec, field) and getattr(sec, field) % gpus:
            raise ConfigError(f"{name}.{field}={getattr(sec, field)} must divide evenly over --gpus {gpus}")
    tp = getattr(sec, "vllm_tensor_parallel_size", 1)
    if sec.kind == "grpo" and gpus % tp:
        raise ConfigError(f"{name}.vllm_tensor_parallel_size={tp} must divide --gpus {gpus}")


def dry_run(recipe: RecipeConfig, console: Console, gpu_gib: float = 80.0, device: str = "cpu",
            full_size: bool = False, gpus: int = 1) -> None:
    """Validate, run each stage one step with stand-ins (on CPU, or on `device`: bench/gpu_check.sh runs every
    GPU recipe so on CUDA, full_size for real-shaped weights), print each stage's timings and memory plan."""
    from grpo.data import load_rows
    from grpo.data.tokenizer import train_bpe
    from grpo.pipeline import resolve_refs
    from grpo.templates import render

    with tempfile.TemporaryDirectory(prefix="r1-dry-run-") as tmp:
        tmp = Path(tmp)
        rows = load_rows(DataConfig(source="synthetic:arith", num_examples=200, completion_column="solution"))
        texts = [render("r1_zero", r["prompt"]) + " " + r["completion"] for r in rows]
        train_bpe(texts, 400).save_pretrained(str(tmp / "tok"))
        names = {v for s in recipe.stages for f in ("model", "teacher", "tokenizer")
                 if isinstance(v := getattr(recipe.sections[s], f, None), str) and not v.startswith("stage:")}
        models = {name: _stand_in(name, tmp / f"model-{i}", tmp / "tok", full_size)
                  for i, name in enumerate(sorted(names))}
        dirs: dict[str, Path] = {}
        real: dict[str, str] = {}  # stage name -> the real model it trains or samples (for stage:NAME)
        current, current_real = None, None
        for i, name in enumerate(recipe.stages):
            sec = recipe.sections[name]
            model = sec.model or current_real
            if isinstance(model, str) and model.startswith("stage:"):
                model = real.get(model[6:])
            check_split(name, sec, gpus)
            plan = memory_plan(sec, model, gpu_gib, gpus) if model else []
            small = resolve_refs(_shrunk(sec, models, device), dirs, name)
            stage_dir = dirs[name] = tmp / "run" / f"{i:02d}-{name}"
            console.rule(f"[bold]dry run {i}: {name} ({sec.kind})")
            stage_runner(sec.kind)(small, small.model or current, stage_dir, console)
            if (stage_dir / "metrics.jsonl").is_file():  # the step's phases (GPU checks quote them)
                last = json.loads((stage_dir / "metrics.jsonl").read_text().splitlines()[-1])
                timing = {k: round(v, 4) for k, v in last.items()
                          if k.startswith(("time/", "rollout/weight_sync", "compute/seconds"))}
                console.print(f"\\[dry-run] {name} timings: {timing}")
            real[name] = model
            if STAGES[sec.kind].chains:
                current, current_real = str(stage_dir / "final"), model
            if plan:
                how = sec.runtime.distributed if spreads(sec) else "not sharded"
                spread = f", {how} over {gpus} GPUs" if gpus > 1 else ""
                table = Table(title=f"{name}: memory per GPU for {model} "
                                    f"(dtype {sec.runtime.dtype}{', LoRA' if sec.runtime.lora else ''}{spread})")
                table.add_column("part")
                table.add_column("GiB", justify="right")
                for part, gib in plan:
                    table.add_row(part, f"{gib:.2f}")
                total = sum(g for _, g in plan)
                table.add_row("total", f"{total:.2f}" + (" (over the GPU's memory)" if total > gpu_gib else ""))
                console.print(table)
        console.print(f"\\[dry-run] {recipe.name}: every stage built and ran one step on {'CPU' if device == 'cpu' else device} stand-ins; "
                      f"plans assume {gpus} x {gpu_gib:.0f} GiB GPUs")
