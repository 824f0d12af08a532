"""Typed stage configs (pydantic, extra="forbid"), YAML loading, `key.sub=value` overrides, one-line errors.

A recipe file holds one section per stage (`pretrain`, `grpo`, `eval`, ...) and the order to run them in.
Everything is validated before any model is built; an unknown key names itself, the file or override it came
from, and the closest valid key.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, reported as one line without a traceback."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(Strict):
    """Where prompts come from and which columns mean what. `source` is `synthetic:arith`,
    `reasoning_gym:<task>`, a .jsonl/.json/.parquet file, or `hf:<name or local path>` (datasets, offline)."""

    source: str = "synthetic:arith"
    split: str = "train"  # for synthetic and reasoning_gym: train | test (held-out, disjoint from train)
    num_examples: int | None = None
    seed: int = 0
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    completion_column: str | None = None  # SFT target text (synthetic: "solution")
    columns: dict[str, str] = Field(default_factory=dict)  # extra columns to pass to rewards: {reward_kwarg: column}
    # synthetic:arith only
    min_ops: int = 2
    max_ops: int = 3
    tagged_fraction: float = Field(1.0, ge=0.0, le=1.0)  # share of worked solutions written in R1 tags


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


class OptimFields(Strict):
    """Optimizer fields shared by the training stages (flat, as in TRL's configs)."""

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
    data: DataConfig = Field(default_factory=DataConfig)
    template: str = "r1_zero"
    loss_on: Literal["completion", "all"] = "completion"
    steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=8)
    seed: int = 0
    log_every: int = 10


class GRPOConfig(OptimFields):
    """Group Relative Policy Optimization (DeepSeekMath / R1)."""

    kind: Literal["grpo"] = "grpo"
    model: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    template: str = "r1_zero"
    rollout: Literal["native", "vllm"] = "native"
    vllm_gpu_memory_utilization: float = 0.3
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(16, ge=1)
    steps: int = Field(100, ge=1)
    num_iterations: int = Field(1, ge=1)  # mu: policy updates per batch of rollouts
    micro_batch_size: int = Field(64, ge=1)
    beta: float = Field(0.04, ge=0.0)  # KL coefficient; 0 disables the reference model
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon_low; DAPO's clip-higher uses 0.28
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
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
        return self


class EvalConfig(Strict):
    """pass@1 averaged over k samples, cons@k (majority vote) and pass@k on a held-out split."""

    kind: Literal["eval"] = "eval"
    model: str | None = None
    data: DataConfig = Field(default_factory=lambda: DataConfig(split="test", num_examples=256))
    template: str = "r1_zero"
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    k: int = Field(4, ge=1)
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="accuracy"), RewardConfig(name="format")])
    seed: int = 1234


StageConfig = Union[SFTConfig, GRPOConfig, EvalConfig]
_KINDS = {"sft": SFTConfig, "grpo": GRPOConfig, "eval": EvalConfig}


class RecipeConfig(Strict):
    """A recipe: named stage sections and the order to run them in; stage outputs chain into the next stage."""

    name: str
    description: str = ""
    output_dir: str = "runs/${name}"
    stages: list[str]
    sections: dict[str, StageConfig] = Field(default_factory=dict)  # filled by load_recipe, section by section


# ---------------------------------------------------------------- loading, overrides, errors

_RECIPE_KEYS = {"name", "description", "output_dir", "stages"}


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
    return raw.get("kind", name if name in _KINDS else "sft" if name in ("pretrain", "cold_start") else None)


def _section(name: str, raw: Any, where: str, origin: dict[tuple, str]) -> StageConfig:
    """Validate one stage section; its kind is its `kind` key or, by default, its name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section {name!r} must be a mapping")
    kind = _kind_of(name, raw)
    if kind not in _KINDS:
        raise ConfigError(f"{where}: section {name!r} needs `kind:` one of {', '.join(_KINDS)}")
    cls = _KINDS[kind]
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
    recipe.sections = sections
    missing = [s for s in recipe.stages if s not in sections]
    if missing:
        hint = difflib.get_close_matches(missing[0], list(sections), n=1)
        raise ConfigError(f"{where}: stage {missing[0]!r} has no section" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    recipe.output_dir = recipe.output_dir.replace("${name}", recipe.name)
    return recipe


_ALL_STAGE_KEYS = set().union(*(set(c.model_fields) for c in _KINDS.values()))


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
        return _KINDS[kind].model_validate({**tree, "kind": kind}), None
    except ValidationError as err:
        raise ConfigError(_format_error(err, _KINDS[kind], str(path), origin)) from None
