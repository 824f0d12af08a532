"""What every stage shares, in one place (nanochat's compute_init, torchtune's training/): the seed, the optimizer
and its schedule, data parallelism through accelerate with metric averaging and replica checks, the progress bar,
and metric logging (metrics.jsonl, truncated to the checkpoint on resume; tensorboard and wandb through Trackers). Stages import this module, never each other.

The `runtime` section of every stage config lands here too: the stage's device, the weights' dtype, bf16 autocast,
a reference/teacher dtype, gradient checkpointing and a LoRA adapter through peft.

Scale-out (`runtime.distributed`): DDP through accelerate, FSDP2 (torch's fully_shard on each decoder layer, then
on the module that runs the whole loss forward), or DeepSpeed ZeRO-2/3 through accelerate's DeepSpeed plugin, for SFT
and GRPO, on accelerate's process group (gloo on CPU). The loops call backward() and apply_gradients() here, which
become the DeepSpeed engine's own calls under ZeRO. Under FSDP2 and ZeRO the frozen GRPO reference is sharded too.
Simplifications: FSDP2 and ZeRO without LoRA only, GRPO under ZeRO-2 only; fp16 is not offered (it needs loss
scaling); with LoRA a checkpoint's merged weights come from a temporary merged copy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from grpo.config import ConfigError, LoRAConfig, OptimFields, RuntimeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA targets on r1kit's DeepSeek model: MLA projections, dense and shared-expert MLPs; routed experts are 3-D
# parameters (peft target_parameters: one adapter per expert)
DEEPSEEK_LORA_MODULES = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                         "up_proj", "down_proj"]
DEEPSEEK_LORA_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def seed_everything(seed: int) -> None:
    """Seed torch and Python's global RNGs (stages draw data order from their own seeded Random)."""
    torch.manual_seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- device, precision, LoRA: the `runtime` section


def stage_device(rt: RuntimeConfig) -> torch.device:
    """The one device a stage puts its models and batches on: runtime.device, or for `auto` this rank's GPU
    (LOCAL_RANK) when torch sees CUDA, else the CPU."""
    if rt.device == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
    dev = torch.device(rt.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {rt.device}, but torch sees no CUDA device here")
    return dev


def native_bf16(device: torch.device) -> bool:
    """True where bf16 GEMMs run on the hardware: a CUDA GPU that has them, a CPU with bf16 units
    (grpo.runtime.cpu_has_fast_bf16: AVX512-BF16 or AMX; elsewhere bf16 is emulated, slower than fp32). What the
    runtime section's `auto` choices ask."""
    from grpo.runtime import cpu_has_fast_bf16

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def frozen_dtype(rt: RuntimeConfig) -> torch.dtype:
    """dtype of a frozen reference or teacher: reference_dtype, or the trained weights' dtype for `same` (and for
    `auto` where bf16 does not run natively)."""
    if rt.reference_dtype == "auto":
        return torch.bfloat16 if native_bf16(stage_device(rt)) else DTYPES[rt.dtype]
    return DTYPES[rt.dtype if rt.reference_dtype == "same" else rt.reference_dtype]


def sampler_dtype(rt: RuntimeConfig) -> torch.dtype | None:
    """dtype of the native sampler's own weight copy, or None: it samples with the trained weights in place."""
    if rt.sampler_dtype == "same" or (rt.sampler_dtype == "auto" and not native_bf16(stage_device(rt))):
        return None
    return None if DTYPES[rt.dtype] == torch.bfloat16 else torch.bfloat16


def load_frozen(path: str, rt: RuntimeConfig):
    """(model, tokenizer) of a frozen model (teacher, or a sampler that does not train) on the stage's device."""
    from grpo.models import hf

    model, tok = hf.load(path, dtype=frozen_dtype(rt))
    return model.to(stage_device(rt)).eval().requires_grad_(False), tok


def load_trainable(path: str, rt: RuntimeConfig, adapter: Path | None = None):
    """(model, tokenizer) to train from an HF directory: prepare_trainable's device, dtype, checkpointing and
    LoRA; `adapter` (a checkpoint's adapter/ dir) resumes a LoRA run with its trained adapter."""
    from grpo.models import hf

    model, tok = hf.load(path, dtype=DTYPES[rt.dtype])
    return prepare_trainable(model, rt, adapter), tok


def prepare_trainable(model, rt: RuntimeConfig, adapter: Path | None = None):
    """Move a model that will train to the stage's device and dtype, turn on gradient checkpointing, and wrap it
    in a peft LoRA adapter (a fresh one, or `adapter` loaded trainable) when runtime.lora is set."""
    model = model.to(device=stage_device(rt), dtype=DTYPES[rt.dtype])
    if rt.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    if rt.lora is None:
        return model
    if adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return add_lora(model, rt.lora)


def add_lora(model, lora: LoRAConfig):
    """A peft LoRA adapter on `model` (only the adapter trains); see DEEPSEEK_LORA_* for r1kit's MoE model."""
    from peft import LoraConfig, get_peft_model

    from grpo.models import DeepseekForCausalLM

    deepseek = isinstance(model, DeepseekForCausalLM)
    modules = lora.target_modules or (DEEPSEEK_LORA_MODULES if deepseek else "all-linear")
    params = DEEPSEEK_LORA_PARAMETERS if deepseek and lora.target_modules is None else None
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules,
                     target_parameters=params)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # peft's message names the modules it could not find
        raise ConfigError(f"runtime.lora.target_modules: {e}") from None


def compile_layers(model, rt: RuntimeConfig):
    """runtime.compile: torch.compile each decoder layer in place (dynamic shapes), as torchtitan does per block: the
    layers are alike, so they share one compiled graph, and the state-dict names do not change. Call it after
    frozen_copy (a deepcopy would keep calling the original's compiled layers)."""
    if rt.compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    return model


def frozen_copy(model, rt: RuntimeConfig):
    """A frozen copy of the starting policy for the KL reference, in reference_dtype; None under LoRA, where the
    reference is the policy itself with its adapter disabled (adapter_disabled), so no second copy exists."""
    if rt.lora is not None:
        return None
    return copy.deepcopy(model).to(frozen_dtype(rt)).eval().requires_grad_(False)


def adapter_disabled(model):
    """Context in which a peft model computes with its base weights alone (the LoRA reference)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def autocast(rt: RuntimeConfig):
    """bf16 autocast over a forward pass when runtime.mixed_precision is bf16, or `auto` where bf16 runs natively
    (weights stay in their dtype)."""
    if rt.mixed_precision == "no" or (rt.mixed_precision == "auto" and not native_bf16(stage_device(rt))):
        return contextlib.nullcontext()
    return torch.autocast(stage_device(rt).type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (ints and other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def active_params(model) -> int:
    """Parameters a token's forward multiplies by: every matrix but the input embedding (a lookup), less the routed
    experts it skips in each MoE layer (E - K of E). Training FLOPs ~ 6 x this x tokens, a forward 2 x (Kaplan)."""
    from grpo.logprobs import unwrap

    lm = unwrap(model)
    n = sum(p.numel() for p in lm.parameters())
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    if emb is not head:
        n -= emb.numel()
    for moe in getattr(lm, "moe_layers", list)():
        E, K = moe.cfg.n_routed_experts, moe.cfg.num_experts_per_tok
        n -= sum(p.numel() for p in moe.experts.parameters()) * (E - K) // E
    return n


def make_optimizer(model, cfg: OptimFields, total_steps: int):
    """AdamW over the trainable parameters plus a warmup + constant/cosine/linear schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.lr_schedule]

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def backward(wrapped, loss: torch.Tensor, last: bool = True) -> None:
    """loss.backward(); under DeepSpeed the engine's backward, told whether this is the step's `last` micro-batch (ZeRO
    reduces the gradients into its partitions then). The loops weight micro-batch losses themselves, so the engine
    runs with gradient_accumulation_steps 1 and never rescales."""
    if is_deepspeed(wrapped):
        wrapped.set_gradient_accumulation_boundary(last)
        wrapped.backward(loss)
    else:
        loss.backward()


def apply_gradients(wrapped, opt, max_grad_norm: float) -> torch.Tensor:
    """After the step's backward passes: clip the gradient norm to max_grad_norm and step the optimizer, unless the
    norm is not finite (then the step is skipped); clear the gradients; return the norm before clipping. Under
    DeepSpeed the engine does all of it (its gradient_clipping is max_grad_norm; it skips a non-finite step too)."""
    if is_deepspeed(wrapped):
        wrapped.step()
        return torch.tensor(float(wrapped.get_global_grad_norm()))
    grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_grad_norm))
    if torch.isfinite(grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def optimizer_step(model, opt, sched, max_grad_norm: float, wrapped=None) -> torch.Tensor:
    """apply_gradients (on `wrapped`, the DDP / FSDP2 / DeepSpeed module around `model`, if any), then step the
    schedule and update r1kit's DeepSeek router bias (aux-loss-free balancing, once per step); returns the norm
    before clipping."""
    grad_norm = apply_gradients(model if wrapped is None else wrapped, opt, max_grad_norm)
    sched.step()
    if hasattr(model, "update_expert_bias"):
        expert_bias_step(model)
    return grad_norm


def expert_bias_step(model) -> dict[str, float]:
    """r1kit's DeepSeek aux-loss-free bias update (once per optimizer step) over the GLOBAL batch: each MoE layer's
    token loads are first summed over ranks, so every rank makes the same update from the loads one process would
    count (DDP does not broadcast the load buffers: distributed() turns broadcast_buffers off). Returns the load
    stats (moe/load_max_over_mean...)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for m in model.moe_layers():
            dist.all_reduce(m.load)  # token counts: exact in fp32 up to 2^24 per expert
    return model.update_expert_bias()


def progress(console: Console) -> Progress:
    """The progress bar every loop shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)


def open_metrics(path: Path, resume_step: int = 0, main: bool = True):
    """metrics.jsonl for appending: a fresh run starts it empty, a resumed one first drops the lines of steps after
    its checkpoint (they are redone); ranks other than 0 write nowhere."""
    if not main:
        return open(os.devnull, "w")
    if resume_step and path.is_file():
        kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
        path.write_text("".join(l + "\n" for l in kept))
    return open(path, "a" if resume_step else "w")


class Trackers:
    """Where a training loop's metrics go (`report_to`): jsonl (metrics.jsonl, always), tensorboard (event files in
    out_dir/tb, read by `tensorboard --logdir`), wandb (offline unless WANDB_MODE says otherwise; `wandb sync` uploads
    later). Only rank 0 writes. A resumed run truncates metrics.jsonl to its checkpoint's step (open_metrics)."""

    KINDS = ("jsonl", "tensorboard", "wandb")

    def __init__(self, out_dir: Path, report_to: list[str], resume_step: int = 0, main: bool = True,
                 run_name: str = "r1kit", config: dict | None = None):
        unknown = [k for k in report_to if k not in self.KINDS]
        if unknown:
            raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(self.KINDS)}")
        self.jsonl = open_metrics(out_dir / "metrics.jsonl", resume_step, main)
        self.tb = self.wandb = None
        if main and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        if main and "wandb" in report_to:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "r1kit"), name=run_name,
                                    dir=str(out_dir), config=config or {}, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        """One step's scalars to every tracker (non-numbers go to jsonl only)."""
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table of sample completions: a markdown text in tensorboard, a wandb.Table, a jsonl line."""
        self.jsonl.write(json.dumps({"step": step, name: [dict(zip(columns, r)) for r in rows]}) + "\n")
        if self.tb is not None:
            esc = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            md = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                           + ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows])
            self.tb.add_text(name, md, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Table(columns=columns, data=[[str(x) for x in r] for r in rows])}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def distributed(module, opt, rt: RuntimeConfig, max_grad_norm: float = 1.0):
    """Under torchrun: (wrapped module, optimizer, rank, world size) on accelerate's process group, every
    collective bounded by rt.collective_timeout_s; else unchanged (every rt.distributed is a no-op in one process).
    auto/ddp: DDP; fsdp2: shard_fsdp2; deepspeed (or auto under `accelerate launch` with a DeepSpeed config): the
    DeepSpeed engine (deepspeed_engine). Gradients are reduced only for parameters used inside the wrapped module's
    forward: wrap the module that runs the whole loss forward, never call its inner model directly for the loss."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return module, opt, 0, 1
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    # `accelerate launch --config_file` with a DeepSpeed or an FSDP config picks the kind for `auto`
    launched = next((k for k, env in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp2", "ACCELERATE_USE_FSDP"))
                     if os.environ.get(env, "false").lower() == "true"), None)
    if launched and rt.distributed not in ("auto", launched):
        raise ConfigError(f"runtime.distributed: {rt.distributed}, but accelerate was launched with a {launched} "
                          f"config; use auto or {launched}, or launch without that config")
    if launched == "fsdp2" and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError("accelerate config: fsdp_version 1 is not offered; set fsdp_version: 2")
    kind = launched or rt.distributed
    if kind == "deepspeed":
        return deepspeed_engine(module, opt, rt, max_grad_norm, launched == "deepspeed")
    # unused parameters are normal here: MTP heads and experts that got no token in a step. No buffer broadcast:
    # DDP would overwrite every rank's MoE load counters with rank 0's at each forward (expert_bias_step sums
    # them over ranks instead); the other buffers (rotary frequencies) are constants
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True,
                                                                     broadcast_buffers=False),
                                       InitProcessGroupKwargs(timeout=timedelta(seconds=rt.collective_timeout_s))])
    if kind == "fsdp2":
        # accelerate 1.15's own FSDP plugin is not used: with Accelerator(cpu=True,
        # fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)) under torchrun on CPU, distributed_type stays
        # MULTI_CPU and prepare() silently returns a DDP module (seen here), so fully_shard is called directly
        return shard_fsdp2(module, opt, acc.device), opt, acc.process_index, acc.num_processes
    module, opt = acc.prepare(module, opt)
    return module, opt, acc.process_index, acc.num_processes


def process_group(rt: RuntimeConfig) -> tuple[int, int]:
    """(rank, world size) for a stage that trains nothing but splits work over torchrun's processes (reject):
    accelerate's process group, every collective bounded by rt.collective_timeout_s; (0, 1) in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=rt.collective_timeout_s))])
    return acc.process_index, acc.num_processes


def deepspeed_engine(module, opt, rt: RuntimeConfig, max_grad_norm: float, launched: bool):
    """(DeepSpeed engine around `module`, its ZeRO optimizer around `opt`, rank, world size): ZeRO rt.zero_stage, or
    the stage, offload and the rest of the accelerate DeepSpeed config that launched us (its `auto` values filled
    here). fp32 weights, or bf16 ones with DeepSpeed's fp32 master copy for runtime.dtype bfloat16. Under ZeRO-3 the
    head weight, which the fused log-prob reads outside the head's own forward, is the root's external parameter,
    so the root's forward gathers it.
    deepspeed.initialize, not accelerate's prepare: accelerate keeps one DeepSpeed plugin per process, set by its
    first Accelerator ("You cannot pass in a `deepspeed_plugin` when creating a second `Accelerator`"), and after an
    Accelerator made for DDP its prepare() silently returns DDP; each stage of a run builds its own engine. The
    process group is still accelerate's, and the config is read by accelerate's DeepSpeedPlugin."""
    from datetime import timedelta

    import deepspeed
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DeepSpeedPlugin

    if rt.dtype == "float16":
        raise ConfigError("runtime.dtype: float16 is not offered with deepspeed (it needs loss scaling); use bfloat16")
    acc = Accelerator(cpu=not torch.cuda.is_available(),  # the process group (gloo on CPU), every collective bounded
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=rt.collective_timeout_s))])
    plugin = DeepSpeedPlugin() if launched else DeepSpeedPlugin(zero_stage=rt.zero_stage,
                                                                  gradient_clipping=max_grad_norm)
    ds = copy.deepcopy(plugin.deepspeed_config)
    del plugin  # with it goes transformers' global ZeRO-3 flag, which would partition later from_pretrained loads
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config: remove its `{section}` section; r1kit builds the optimizer and its "
                              f"schedule from the stage's learning_rate, warmup_steps and lr_schedule")
    # the loops split the global batch over ranks and weight their micro-batches themselves (backward())
    ds.update(train_micro_batch_size_per_gpu=1, train_batch_size=acc.num_processes, gradient_accumulation_steps=1)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = max_grad_norm
    if ds.get("bf16", {}).get("enabled") == "auto" or rt.dtype == "bfloat16":
        ds["bf16"] = {"enabled": rt.dtype == "bfloat16"}
    auto = [k for k, v in ds.items() if v == "auto"]
    if auto:
        raise ConfigError(f"DeepSpeed config: `{auto[0]}` is auto, which r1kit does not fill; give it a value")
    if ds["zero_optimization"]["stage"] == 3:
        # a launching DeepSpeed config file's own threshold wins
        ds["zero_optimization"].setdefault("stage3_param_persistence_threshold", rt.zero3_param_persistence_threshold)
        lm = next(m for m in module.modules() if hasattr(m, "get_output_embeddings"))  # the causal LM inside
        deepspeed.zero.register_external_parameter(module, lm.get_output_embeddings().weight)
    engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds, dist_init_required=False)
    return engine, opt, acc.process_index, acc.num_processes


def describe(wrapped, world: int) -> str:
    """How a stage's training is spread, for its first printed line: 'DeepSpeed ZeRO-3 over 2 processes'."""
    if world == 1:
        return "one process"
    kind = (f"DeepSpeed ZeRO-{wrapped.zero_optimization_stage()}" if is_deepspeed(wrapped)
            else "FSDP2" if is_fsdp2(wrapped) else "DDP")
    return f"{kind} over {world} processes"


def is_deepspeed(module) -> bool:
    """True for a DeepSpeed engine (deepspeed_engine's wrapped module)."""
    import sys

    return "deepspeed" in sys.modules and isinstance(module, sys.modules["deepspeed"].DeepSpeedEngine)


def zero3(module) -> bool:
    """True for a DeepSpeed engine that partitions the weights themselves (ZeRO-3)."""
    return is_deepspeed(module) and module.zero_optimization_stage() == 3


def decoder_layers(module) -> list:
    """The decoder layers of the causal LM inside `module` (a TokenLogprobs scorer, an SFT loss module, or the LM):
    the first ModuleList named `layers` (HF's and r1kit's backbone.layers; MTP heads stay in the root unit)."""
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(m, torch.nn.ModuleList):
            return list(m)
    raise ValueError(f"runtime: found no decoder layers to shard or compile in {type(module).__name__}")


def shard_fsdp2(module, opt, device: torch.device):
    """FSDP2 in place: fully_shard each decoder layer, then `module` as the root unit (it holds the embedding, final
    norm and head: the fused log-prob reads head.weight directly, inside the root's forward, so it is unsharded
    there). The optimizer is re-pointed at the sharded (DTensor) parameters; it must hold no state yet."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if opt is not None and opt.state:
        raise ValueError("runtime.distributed: fsdp2 cannot resume a DDP or one-process checkpoint's optimizer state "
                         "(its trainer_state holds whole tensors); resume with the distributed setting it was saved with")
    names = {id(p): n for n, p in module.named_parameters()}
    for t in module.state_dict().values():  # every rank shards rank 0's weights (DDP broadcasts them too)
        torch.distributed.broadcast(t, 0)
    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # the root must run FSDP's lazy init first: GRPO's sampler calls the layers (not the root) before any loss
    # forward, and a layer whose forward runs first would make itself the root (a private call, no public one)
    fully_shard.state(module)._lazy_init()
    sharded = dict(module.named_parameters())
    if opt is not None:
        for group in opt.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return module


def shard_frozen(frozen, wrapped, world: int, device: torch.device):
    """A sharded run's frozen module (the GRPO reference), sharded too: under FSDP2 or DeepSpeed ZeRO `frozen` gets
    shard_fsdp2's layout, so each rank holds 1/world of it and its no-grad forward all-gathers one layer at a time
    (ZeRO-3 inference; TRL keeps it whole under ZeRO-2). Unchanged under DDP or in one process."""
    if world == 1 or not (is_fsdp2(wrapped) or is_deepspeed(wrapped)):
        return frozen
    return shard_fsdp2(frozen, None, device)


def reshard(module) -> None:
    """Free the weights an FSDP2 root keeps gathered after its forward (it expects a backward next; a frozen
    module runs none). A no-op for any other module."""
    if hasattr(module, "reshard"):
        module.reshard()


def local_elements(module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): equal unless FSDP2 shards it."""
    params = list(module.parameters())
    return (sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
            sum(p.numel() for p in params))


def gathered(t: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 partitioned parameter's whole value (a copy: the gather is released at once; a collective, so every
    rank calls it in the same order), or `t` itself."""
    if not hasattr(t, "ds_id"):
        return t
    import deepspeed

    with deepspeed.zero.GatheredParameters([t]):
        return t.data.detach().clone()


def copy_weights(dst, src) -> None:
    """dst's weights and buffers := src's (GRPO's reference reset; same names, any dtypes). Where dst is
    FSDP2-sharded each rank writes only its own shard: from src's shard when src is sharded alike (no gather), or
    from src's whole tensor's matching chunk (distribute_tensor without communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not is_fsdp2(dst):
        dst.load_state_dict(full_state_dict(src))
        return
    whole = src.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            v = gathered(whole[name]).detach()  # ZeRO-3: this tensor gathered, in dst's order on every rank
            if isinstance(t, DTensor):
                if not isinstance(v, DTensor) or v.placements != t.placements:
                    v = distribute_tensor(v.full_tensor() if isinstance(v, DTensor) else v, t.device_mesh,
                                          t.placements, src_data_rank=None)
                t.to_local().copy_(v.to_local())
            else:
                t.copy_(v.full_tensor() if isinstance(v, DTensor) else v)


def is_fsdp2(module) -> bool:
    """True when the module's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (under FSDP2 it is a replicated DTensor: the global norm)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model, rank0_only: bool = False) -> dict:
    """The model's full (unsharded) state dict: under FSDP2 gathered by every rank (a collective; with rank0_only,
    on the CPU of rank 0 alone, the others get {}); under ZeRO-3 gathered tensor by tensor on every rank; else
    model.state_dict()."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return {n: gathered(t).detach() for n, t in model.state_dict(keep_vars=True).items()}
    if not is_fsdp2(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


class GatheredForGeneration:
    """A RolloutWorker around one that runs the FSDP2 policy itself (native): the first generate of a step
    all-gathers every FSDP unit (unshard, one collective per unit, on every rank) and keeps it whole, so no
    collective runs inside generation (ranks may sample different numbers of tokens); sleep(), which every rank
    calls once after sampling, reshards. The same idea as TRL's ds3_gather_for_generation."""

    def __init__(self, worker, root):
        from torch.distributed.fsdp import FSDPModule

        self.worker, self.root = worker, root
        self.units = [m for m in root.modules() if isinstance(m, FSDPModule)]  # root first, then the layers
        self.gathered = False

    def generate(self, *args, **kwargs):
        if not self.gathered:
            for u in self.units:
                if u is not self.root:  # the root never reshards after forward anyway
                    u.set_reshard_after_forward(False, recurse=False)
                u.unshard()
            self.gathered = True
        return self.worker.generate(*args, **kwargs)

    def sleep(self) -> None:
        if self.gathered:
            for u in self.units:
                u.reshard()
                if u is not self.root:
                    u.set_reshard_after_forward(True, recurse=False)
            self.gathered = False
        self.worker.sleep()

    def __getattr__(self, name):
        return getattr(self.worker, name)


class Zero3GatheredForGeneration:
    """GatheredForGeneration under DeepSpeed ZeRO-3: the first generate of a step enters DeepSpeed's own
    unwrap_model_for_generation (every partitioned parameter gathered, its per-module fetch hooks lifted), so no
    collective runs inside generation; sleep() leaves it (hooks back, weights partitioned again)."""

    def __init__(self, worker, engine):
        self.worker, self.engine, self.ctx = worker, engine, None

    def generate(self, *args, **kwargs):
        if self.ctx is None:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            self.ctx = unwrap_model_for_generation(self.engine)
            self.ctx.__enter__()
        return self.worker.generate(*args, **kwargs)

    def sleep(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None
            # the forwards of generation ran without the hooks: DeepSpeed's recorded fetch order is stale
            coordinator = self.engine.optimizer.parameter_offload.get_param_coordinator()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()
        self.worker.sleep()

    def __getattr__(self, name):
        return getattr(self.worker, name)


def for_generation(worker, scorer):
    """`worker`, or with the native sampler under FSDP2 a GatheredForGeneration around it, under ZeRO-3 a
    Zero3GatheredForGeneration (vLLM holds its own weights: its push gathers the shards tensor by tensor,
    rollout/vllm.py sync_tensors)."""
    from grpo.rollout.native import NativeWorker

    if not isinstance(worker, NativeWorker):
        return worker
    if zero3(scorer):
        return Zero3GatheredForGeneration(worker, scorer)
    return GatheredForGeneration(worker, scorer) if is_fsdp2(scorer) else worker


def all_sum(x: float, world: int) -> float:
    """The sum of x over ranks (float64 all-reduce), x itself in one process."""
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def reduce_metrics(metrics: dict[str, float], world: int) -> dict[str, float]:
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


def check_replicas(model, world: int, what: str = "training") -> None:
    """DDP (and ZeRO-2) must leave every rank with the same weights; fail loudly rather than save one rank's drift.
    Skipped under FSDP2 and ZeRO-3, where each rank holds different shards."""
    if world == 1 or is_fsdp2(model) or any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 partitions
        return
    import torch.distributed as dist

    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    seen = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(seen, total)
    if any(not torch.allclose(x, seen[0], rtol=1e-9, atol=1e-9) for x in seen):
        raise RuntimeError(f"{what} replicas diverged across ranks: parameter sums {[float(x) for x in seen]}")


def barrier(world: int) -> None:
    """No rank goes on before all have arrived (e.g. until rank 0's checkpoint is in place)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
