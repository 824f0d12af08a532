"""Evaluation as DeepSeek-R1 reports it: sample k completions per held-out problem (k = n of Chen et al. 2021)
and report pass@1 (the mean score over the k samples, R1's definition), the unbiased pass@j for each j in
`pass_at`, cons@k (majority vote over the k extracted answers), format compliance and a format-blind check.

One stage evaluates one checkpoint on `data` (result.json holds flat metric keys) or on each of `benchmarks`
(result.json holds {benchmark: metrics}), and writes result.md beside it: a table in the layout of R1's
Table 5 (a row per model, a column per benchmark and metric). Formulas and keys: docs/evaluation.md.

Simplifications: every benchmark shares the stage's template, sampling and rewards; the reward labelled
`accuracy` (else the first) decides correctness, and a sample counts as correct for pass@j (j > 1) when it
scores 1.0; majority voting compares extracted answer strings as written ("35" and "35.0" are two votes).

Under torchrun each rank samples a contiguous share of every benchmark's problems, with the request seeds those
problems have in one process (SamplingParams.first_index), and the shares are gathered in rank order, so the
numbers equal one process's; every rank scores the gathered samples and rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console

import rewards as reward_lib
from grpo.accel import barrier, load_frozen, process_group
from grpo.checkpoint import atomic_dir
from grpo.config import DataConfig, EvalConfig
from grpo.data import load_rows
from grpo.models import hf
from grpo.rollout import SamplingParams, make_worker
from grpo.templates import render
from rewards.accuracy import extract_answer
from rewards._text import completion_text

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_TABLE_METRIC = re.compile(r"(pass|cons)@\d+")  # the metrics of R1's Table 5, shown as percentages


def last_number_correct(text: str, gold: str) -> float:
    """Format-blind check: is the last number in the text the gold number? Separates maths from format."""
    nums = _NUM.findall(text)
    try:
        return float(bool(nums) and float(nums[-1]) == float(gold))
    except ValueError:
        return float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def benchmark_name(data: DataConfig) -> str:
    """A short column name for a dataset: `synthetic:arith` -> arith, `hf:openai/gsm8k` -> gsm8k, a file -> its stem."""
    src = data.source
    if src.split(":", 1)[0] in ("synthetic", "reasoning_gym", "hf"):
        src = src.split(":", 1)[1]
    return Path(src.rstrip("/")).stem or data.source


def _score(cfg: EvalConfig, comps, rows: list[dict], prompts: list[str], reward_set) -> dict[str, float]:
    """The metrics of one benchmark from its len(rows) * k completions (prompt-major)."""
    k = cfg.k
    src = [rows[c.prompt_index] for c in comps]
    columns = {key: [r.get(key) for r in src] for key in rows[0] if key != "prompt"}
    _, per = reward_set([c.text for c in comps], [prompts[c.prompt_index] for c in comps], **columns)
    acc = per.get("accuracy") or per[next(iter(per))]
    out: dict[str, float] = {"problems": len(rows), "samples": len(comps)}
    correct = [[acc[i * k + j] for j in range(k)] for i in range(len(rows))]
    scored = [[x for x in row if x is not None] for row in correct]  # a problem whose gold is unreadable is skipped
    n_scored = max(1, sum(1 for r in scored if r))
    for j in cfg.pass_at:
        if j == 1:  # R1's pass@1: the mean score over the k samples (the unbiased pass@1 for 0/1 scores)
            out["pass@1"] = sum(sum(r) / len(r) for r in scored if r) / n_scored
        else:  # with fewer than j scored samples (None scores), pass@len(r): whether any of them is correct
            hits = (pass_at_k(len(r), sum(x >= 1.0 for x in r), min(j, len(r))) for r in scored if r)
            out[f"pass@{j}"] = sum(hits) / n_scored
    acc_kwargs = next((r.kwargs for r in cfg.rewards if (r.label or r.name) == "accuracy"), {})
    extract = {key: acc_kwargs[key] for key in ("pattern", "think_in_prompt") if key in acc_kwargs}
    cons = []  # majority vote over all k samples; "no answer" is a candidate too, and scores 0 when it wins
    for i in range(len(rows)):
        if not scored[i]:
            continue
        answers = [extract_answer(completion_text(comps[i * k + j].text), **extract) for j in range(k)]
        top = Counter(answers).most_common(1)[0][0]  # ties: the answer met first
        cons.append(0.0 if top is None else float(correct[i][answers.index(top)] or 0.0))
    out[f"cons@{k}"] = sum(cons) / max(1, len(cons))
    for label, scores in per.items():
        if label != "accuracy":
            vals = [s for s in scores if s is not None]
            out[label] = sum(vals) / max(1, len(vals))
    out["last_number_acc"] = sum(last_number_correct(c.text, str(r["answer"])) for c, r in zip(comps, src)) / len(comps)
    out["mean_length"] = sum(len(c.token_ids) for c in comps) / len(comps)
    return out


def _worker(cfg: EvalConfig, model_path: str, tok, longest: int):
    """The sampler: native on the loaded model, or a vLLM engine on the checkpoint itself with a context window
    of the longest prompt plus max_tokens (at most the checkpoint's own)."""
    if cfg.rollout == "native":
        model, _ = load_frozen(model_path, cfg.runtime)  # runtime: device and dtype
        return make_worker("native", model, tok, model_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    window = longest + cfg.sampling.max_tokens
    own = getattr(config, "max_position_embeddings", None)
    stand_in = SimpleNamespace(config=config)  # make_worker reads only .config; vLLM loads the weights itself
    return make_worker("vllm", stand_in, tok, model_path, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       seed=cfg.seed, max_model_len=min(window, own) if own else window)


def evaluate(cfg: EvalConfig, model_path: str, console: Console | None = None) -> dict:
    """Metrics of the checkpoint at `model_path`: {metric: value} on cfg.data, or {benchmark: {metric: value}}
    on cfg.benchmarks. Each benchmark is sampled with the same seeds, so its numbers do not depend on the
    others (a benchmark alone under `data` gives the same ones)."""
    console = console or Console()
    sets = cfg.benchmarks or {"": cfg.data}
    torch.manual_seed(cfg.seed)
    data = {name: load_rows(d) for name, d in sets.items()}  # every dataset is read before the model is loaded
    tok = hf.load_tokenizer(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = {name: [render(cfg.template, r["prompt"], tok, **{key: v for key, v in r.items() if key != "prompt"})
                      for r in rows] for name, rows in data.items()}
    ids = {name: tok(p, add_special_tokens=False).input_ids for name, p in prompts.items()}
    worker = _worker(cfg, model_path, tok, max(len(x) for v in ids.values() for x in v))
    reward_set = reward_lib.RewardSet.from_specs([r.model_dump() for r in cfg.rewards])
    sp = cfg.sampling
    sampling = SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_tokens=sp.max_tokens,
                              stop=list(sp.stop), seed=cfg.seed, logprobs=False)  # scores need no log-probs
    rank, world = process_group(cfg.runtime)
    results = {}
    try:
        for name, rows in data.items():
            torch.manual_seed(cfg.seed)
            comps = _sample_share(worker, ids[name], cfg.k, sampling, rank, world)
            results[name] = _score(cfg, comps, rows, prompts[name], reward_set)
            if cfg.benchmarks:
                console.print(f"eval {name}: " + ", ".join(f"{key}={v:.3f}" for key, v in results[name].items()
                                                             if _TABLE_METRIC.fullmatch(key)))
    finally:
        if hasattr(worker, "close"):
            worker.close()
    return results if cfg.benchmarks else results[""]


def _sample_share(worker, prompt_ids: list[list[int]], k: int, sampling: SamplingParams, rank: int, world: int):
    """k samples of every prompt, prompt-major: in one process all of them; under torchrun this rank samples its
    contiguous share (seeded as in one process) and the shares are gathered in rank order on every rank."""
    lo, hi = rank * len(prompt_ids) // world, (rank + 1) * len(prompt_ids) // world
    comps = worker.generate(prompt_ids[lo:hi], k, dataclasses.replace(sampling, first_index=lo)) if hi > lo else []
    for c in comps:
        c.prompt_index += lo
    if world == 1:
        return comps
    import torch.distributed as dist

    shares = [None] * world
    dist.all_gather_object(shares, comps)
    return [c for share in shares for c in share]


# ---------------------------------------------------------------- R1-style tables


def per_benchmark(result: dict, name: str) -> dict[str, dict]:
    """{benchmark: metrics} of one result.json: a flat single-dataset result under `name`, or as it is."""
    if result and all(isinstance(v, dict) for v in result.values()):
        return result
    return {name: result}


def _cell(metric: str, value) -> str:
    if value is None:
        return "-"
    if _TABLE_METRIC.fullmatch(metric):
        return f"{100 * value:.1f}"  # R1's tables: percentages with one decimal
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _columns(rows: list[tuple[str, dict[str, dict]]], table_metrics: bool) -> list[tuple[str, str]]:
    """(benchmark, metric) columns in order of first appearance: pass@j/cons@k, or the others."""
    columns: list[tuple[str, str]] = []
    for _, benches in rows:
        for bench, metrics in benches.items():
            for metric in metrics:
                wanted = metric not in ("problems", "samples") and bool(_TABLE_METRIC.fullmatch(metric)) == table_metrics
                if wanted and (bench, metric) not in columns:
                    columns.append((bench, metric))
    return columns


def markdown_table(rows: list[tuple[str, dict[str, dict]]], table_metrics: bool = True) -> str:
    """R1's Table 5 layout: one row per model, one column per benchmark and metric ("arith pass@1 | arith cons@4").
    `rows` are (model label, {benchmark: metrics}). table_metrics: the pass@j and cons@k columns, in percent;
    False: the other metrics (format, last_number_acc, mean_length, ...), as numbers. "" when there are none."""
    columns = _columns(rows, table_metrics)
    if not columns:
        return ""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731  (a "|" in a name would split the cell)
    lines = ["| Model | " + " | ".join(esc(f"{b} {m}") for b, m in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for label, benches in rows:
        lines.append(f"| {esc(label)} | " + " | ".join(_cell(m, benches.get(b, {}).get(m)) for b, m in columns) + " |")
    return "\n".join(lines) + "\n"


def render_report(title: str, rows: list[tuple[str, dict[str, dict]]], note: str = "") -> str:
    """A markdown page: how each benchmark was sampled, the R1 table (pass@j, cons@k in %), the other metrics."""
    sizes: dict[str, str] = {}
    for _, benches in rows:
        for bench, m in benches.items():
            if "problems" in m and "samples" in m:
                per = m["samples"] // max(1, m["problems"])
                sizes.setdefault(bench, f"{bench}: {m['problems']} problems x {per} samples")
    parts = [f"# {title}", ""] + ([note, ""] if note else [])
    if sizes:
        parts += ["; ".join(sizes.values()) + ". pass@1 is the mean score over a problem's samples, pass@j the "
                  "unbiased estimate from them, cons@k their majority vote; all in % (docs/evaluation.md).", ""]
    parts.append(markdown_table(rows))
    other = markdown_table(rows, table_metrics=False)
    if other:
        parts += ["Other metrics (means over all samples):", "", other]
    return "\n".join(parts)


def run(cfg: EvalConfig, model_path: str, out_dir: Path, console: Console | None = None) -> Path:
    """The eval stage: evaluate, then write out_dir/eval/result.json and result.md (R1's table) atomically;
    returns result.json."""
    metrics = evaluate(cfg, model_path, console)
    sp = cfg.sampling
    note = (f"Model `{model_path}`, {cfg.k} samples per problem at temperature {sp.temperature}, top-p {sp.top_p}, "
            f"up to {sp.max_tokens} tokens (rollout: {cfg.rollout}, seed {cfg.seed}).")
    table = render_report("Evaluation", [(str(model_path), per_benchmark(metrics, benchmark_name(cfg.data)))], note)

    def write(d: Path) -> None:
        (d / "result.json").write_text(json.dumps(metrics, indent=2))
        (d / "result.md").write_text(table)

    rank, world = process_group(cfg.runtime)  # under torchrun the ranks split the problems (evaluate); one writes
    if rank == 0:
        atomic_dir(out_dir / "eval", write)
    barrier(world)  # no rank returns before the result is in place
    return out_dir / "eval" / "result.json"
