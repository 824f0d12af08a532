"""Prompt datasets: built-in synthetic tasks, reasoning-gym, JSONL / Parquet files and HF `datasets`.

`load_rows(cfg)` returns plain dict rows whose keys are the canonical `prompt` and `answer` (mapped from the
configured columns) plus every other column, passed through to rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

from grpo.config import DataConfig
from grpo.data.synthetic import arithmetic_lang_rows, arithmetic_rows


class DataError(ValueError):
    """Bad dataset input, reported with the file and row."""


def _read_source(cfg: DataConfig) -> tuple[list[dict], str]:
    """Raw rows and a name for error messages."""
    src = cfg.source
    if src == "synthetic:arith":
        n = cfg.num_examples or (10_000 if cfg.split == "train" else 256)
        return arithmetic_rows(cfg.split, n, cfg.seed, cfg.min_ops, cfg.max_ops, cfg.tagged_fraction), src
    if src == "synthetic:arith_lang":
        n = cfg.num_examples or (10_000 if cfg.split == "train" else 256)
        return arithmetic_lang_rows(cfg.split, n, cfg.seed, cfg.min_ops, cfg.max_ops, cfg.tagged_fraction,
                                    cfg.languages, cfg.mixed_fraction), src
    if src.startswith("synthetic:"):
        raise DataError(f"data.source: unknown synthetic task {src!r} (have: synthetic:arith, synthetic:arith_lang)")
    if src.startswith("reasoning_gym:"):
        import reasoning_gym

        task = src.split(":", 1)[1]
        size = cfg.num_examples or 1000
        seed = cfg.seed if cfg.split == "train" else cfg.seed + 1_000_003
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed)
        return [{"prompt": e["question"], "answer": str(e["answer"]), "task": task} for e in ds], src
    if src.startswith("hf:"):
        import datasets

        name = src[3:]
        saved = Path(name).is_dir() and any((Path(name) / f).exists() for f in ("dataset_info.json", "state.json"))
        ds = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, split=cfg.split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
        return [dict(r) for r in ds], src
    path = Path(src)
    if not path.is_file():
        raise DataError(f"data.source: file {src} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            if path.suffix == ".json":
                data = json.load(f)
                rows = data if isinstance(data, list) else data.get("data", [])
            else:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{src}: line {i + 1} is not valid JSON ({e.msg})") from None
        return rows, src
    if path.suffix == ".parquet":
        import datasets

        return [dict(r) for r in datasets.Dataset.from_parquet(str(path))], src
    raise DataError(f"data.source: cannot read {src!r} (use .jsonl, .json, .parquet, hf:NAME, synthetic:arith, synthetic:arith_lang or reasoning_gym:TASK)")


def load_rows(cfg: DataConfig, require_answer: bool = True) -> list[dict]:
    """Rows with canonical `prompt`/`answer` (and `completion` when configured); errors name row and column."""
    raw, name = _read_source(cfg)
    need = [cfg.prompt_column] + ([cfg.answer_column] if require_answer else []) + ([cfg.completion_column] if cfg.completion_column else []) + list(cfg.columns.values())
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise DataError(f"{name}: row {i} is not an object")
        for col in need:
            if col not in r or r[col] is None:
                raise DataError(f"{name}: row {i} has no column {col!r}" + (f" (columns: {', '.join(sorted(r))})" if r else ""))
        row = dict(r)
        row["prompt"] = r[cfg.prompt_column]
        if require_answer:
            row["answer"] = r[cfg.answer_column]
        if cfg.completion_column:
            row["completion"] = r[cfg.completion_column]
        for kwarg, col in cfg.columns.items():
            row[kwarg] = r[col]
        rows.append(row)
    if cfg.num_examples is not None and cfg.source.split(":")[0] not in ("synthetic", "reasoning_gym"):
        rows = rows[: cfg.num_examples]
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows
