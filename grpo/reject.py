"""Rejection sampling (DeepSeek-R1 section 2.3.3): sample N completions per prompt, keep the ones the reward set
accepts and R1's filters pass, drop near-duplicates, cap each prompt, and write a dataset plus stats.json.

Every sample is counted exactly once, as kept or under the first reason (reasons(), in this order) that drops it:
contaminated (its prompt overlaps an eval set; never sampled), truncated, rejected:<reward label> (the keep rule,
in the order of `keep`), mixed_language, long_paragraph, code_block, repetition, duplicate, cap.
Work is done in shards of `shard_size` prompts, each written atomically under out_dir/shards/ and sampled with a
seed that depends only on (seed, shard index), so a killed run resumes at the next unfinished shard and ends
byte-identical to an uninterrupted one. Under torchrun the ranks split the unfinished shards (rank r takes every
world-th one, each rank its own sampler on its own device) and rank 0 assembles the dataset, so N processes write
the same bytes as one. Simplifications: the HF model is loaded in-process even under vLLM (for the tokenizer and the native engine); decontamination compares prompts only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from rich.console import Console

import rewards as reward_lib
from grpo.accel import barrier, load_frozen, process_group, progress, seed_everything
from grpo.checkpoint import atomic_dir
from grpo.config import ConfigError, RejectConfig
from grpo.data import DataError, load_rows
from grpo.rollout import SamplingParams, make_worker
from grpo.templates import render
from rewards._text import completion_text, prompt_text
from rewards.language import language_reward
from rewards.shaping import repetition_reward

FILTERS = ("mixed_language", "long_paragraph", "code_block", "repetition")


def reasons(keep: dict[str, float]) -> list[str]:
    """Drop reasons in precedence order: a sample is counted under the first one that applies."""
    return ["contaminated", "truncated", *[f"rejected:{label}" for label in keep], *FILTERS, "duplicate", "cap"]


# ---------------------------------------------------------------- pure text functions

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Normalised tokens (NFKC, lower case): runs of letters/digits, and each symbol on its own (so 3 + 4 != 3 * 4)."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(toks: list[str], n: int) -> frozenset:
    """The set of token n-grams; a text shorter than n tokens is one gram, itself (compared whole)."""
    if len(toks) < n:
        return frozenset([tuple(toks)]) if toks else frozenset()
    return frozenset(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b|; two empty sets are identical."""
    return len(a & b) / len(a | b) if a or b else 1.0


def long_paragraph(text: str, max_chars: int) -> bool:
    """Does any paragraph (text between blank lines) run over max_chars characters?"""
    return any(len(p.strip()) > max_chars for p in re.split(r"\n\s*\n", text))


def has_code_block(text: str) -> bool:
    """A fenced ``` block anywhere in the completion."""
    return "```" in text


def repetitive(texts: list[str], ngram: int, max_share: float) -> list[bool]:
    """More than max_share of the word n-grams are repeats (rewards.shaping's repetition penalty, at -1 max)."""
    return [-p > max_share for p in repetition_reward(texts, ngram=ngram, max_penalty=-1.0)]


def mixed_language(texts: list[str], prompts: list[str], threshold: float, language: str | None = None,
                   langs: list | None = None, shares: list | None = None) -> list[bool]:
    """The chain of thought's target-language share (rewards.language) is below threshold; None (no words to
    judge, or no target language) passes. `shares`: already computed scores (the reward set's language)."""
    if shares is None:
        shares = language_reward(texts, prompts, language=language, **({"lang": langs} if langs is not None else {}))
    return [s is not None and s < threshold for s in shares]


def keep_rule(cfg: RejectConfig, labels: list[str]) -> dict[str, float]:
    """{reward label: min score}: cfg.keep, else accuracy >= 1 and format >= 1, plus language >= tau, where present."""
    if cfg.keep is not None:
        return dict(cfg.keep)
    rule = {label: 1.0 for label in ("accuracy", "format") if label in labels}
    if "language" in labels:
        rule["language"] = cfg.language_threshold
    return rule


def fails_keep(scores: dict[str, float | None], keep: dict[str, float]) -> str | None:
    """The first keep threshold a sample misses, as a reason; None scores fail, except language's (no words)."""
    for label, low in keep.items():
        s = scores[label]
        if s is None and label == "language":
            continue
        if s is None or s < low:
            return f"rejected:{label}"
    return None


def select(texts: list[str], lengths: list[int], threshold: float | None, ngram: int, cap: int | None,
           mode: str) -> list[str | None]:
    """One prompt's surviving traces -> None (kept), "duplicate" or "cap" each. Shortest first, a trace whose
    n-gram Jaccard with an accepted one reaches threshold is a duplicate; then at most `cap` stay: the shortest,
    or (diverse) greedily the one least similar to those chosen so far, starting from the shortest."""
    grams = [ngrams(tokens(t), ngram) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    out: list[str | None] = [None] * len(texts)
    accepted: list[int] = []
    for i in order:
        if threshold is not None and any(jaccard(grams[i], grams[j]) >= threshold for j in accepted):
            out[i] = "duplicate"
        else:
            accepted.append(i)
    if cap is None or len(accepted) <= cap:
        return out
    if mode == "shortest":
        chosen = accepted[:cap]
    else:
        chosen, rest = accepted[:1], accepted[1:]
        while len(chosen) < cap:
            best = min(rest, key=lambda i: (max(jaccard(grams[i], grams[j]) for j in chosen), lengths[i], i))
            chosen.append(best)
            rest.remove(best)
    for i in accepted:
        if i not in chosen:
            out[i] = "cap"
    return out


def contaminated(prompts: list[str], eval_prompts: list[str], n: int) -> list[bool]:
    """Prompts sharing a token n-gram with any eval prompt (prompts shorter than n tokens: identical to one)."""
    seen = set().union(*(ngrams(tokens(p), n) for p in eval_prompts)) if eval_prompts else set()
    return [not seen.isdisjoint(ngrams(tokens(p), n)) for p in prompts]


def first_reasons(n: int, checks: list[tuple[str, object]]) -> list[str | None]:
    """Apply (reason, fn(alive indices) -> [bool]) in order; each sample gets the first reason that drops it."""
    out: list[str | None] = [None] * n
    for reason, check in checks:
        alive = [i for i in range(n) if out[i] is None]
        if not alive:
            break
        for i, bad in zip(alive, check(alive)):
            if bad:
                out[i] = reason
    return out


def summarise(shards: list[dict], kept_tokens: list[int], order: list[str], contaminated_prompts: int,
              cfg: RejectConfig, model_path: str, prompts: int) -> dict:
    """stats.json from the shards' counts: kept, dropped by reason, pass-rate histogram, tokens per kept trace."""
    N = cfg.samples_per_prompt
    dropped = {r: 0 for r in order}
    dropped["contaminated"] = contaminated_prompts * N
    hist = [0] * (N + 1)
    sums: dict[str, list[float]] = {}
    for s in shards:
        for r, c in s["dropped"].items():
            dropped[r] += c
        for p in s["passes"]:
            hist[p] += 1
        for label, (total, count) in s["reward_sums"].items():
            acc = sums.setdefault(label, [0.0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count
    sampled = sum(hist)
    t = np.asarray(kept_tokens, dtype=np.float64)
    pct = {f"p{q}": float(np.percentile(t, q)) for q in (10, 50, 90, 99)} if len(t) else {}
    return {
        "source_model": str(model_path), "prompts": prompts, "samples_per_prompt": N, "samples": prompts * N,
        "kept": len(kept_tokens), "dropped": dropped, "precedence": order, "contaminated_prompts": contaminated_prompts,
        "prompts_with_kept": sum(s["prompts_with_kept"] for s in shards),
        "pass_rate": {"mean": sum(k * c for k, c in enumerate(hist)) / max(1, sampled * N),
                      "histogram": {f"{k}/{N}": c for k, c in enumerate(hist)}},
        "tokens_per_kept": {"mean": float(t.mean()) if len(t) else None, "min": int(t.min()) if len(t) else None,
                            **pct, "max": int(t.max()) if len(t) else None},
        "rewards": {label: total / count if count else None for label, (total, count) in sums.items()},
    }


# ---------------------------------------------------------------- one shard, then the stage loop


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of a shard: a function of (seed, shard index) only, so a resumed shard is the same."""
    return seed * 1_000_003 + shard


def sample_shard(cfg: RejectConfig, worker, tok, reward_set, keep: dict[str, float], rows: list[dict],
                 indices: list[int], shard: int, model_path: str) -> tuple[list[dict], dict]:
    """Sample, score, filter, dedup and cap the prompts rows[indices]; returns (kept rows, shard counts)."""
    N, f, sp = cfg.samples_per_prompt, cfg.filters, cfg.sampling
    src = [rows[i] for i in indices]
    prompts = [render(cfg.template, r["prompt"], tok, **{k: v for k, v in r.items() if k != "prompt"}) for r in src]
    ids = tok(prompts, add_special_tokens=False).input_ids
    comps = worker.generate(ids, N, SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                                   max_tokens=sp.max_tokens, stop=list(sp.stop),
                                                   seed=shard_seed(cfg.seed, shard)))
    texts = [c.text for c in comps]
    row_of = [src[c.prompt_index] for c in comps]
    prompt_of = [prompts[c.prompt_index] for c in comps]
    columns = {k: [r.get(k) for r in row_of] for k in src[0] if k != "prompt"}
    totals, per = reward_set(texts, prompt_of, completion_ids=[c.token_ids for c in comps], **columns)
    scores = [{label: per[label][i] for label in per} for i in range(len(comps))]
    plain = [completion_text(t) for t in texts]

    checks = []  # (reason, fn(indices of samples still alive) -> [drop?]), in precedence order
    if f.truncated:
        checks.append(("truncated", lambda idx: [comps[i].finish_reason == "length" for i in idx]))
    for label, low in keep.items():
        checks.append((f"rejected:{label}", lambda idx, label=label, low=low:
                       [fails_keep(scores[i], {label: low}) is not None for i in idx]))
    if f.mixed_language:
        checks.append(("mixed_language", lambda idx: mixed_language(
            [plain[i] for i in idx], [prompt_text(row_of[i]["prompt"]) for i in idx], cfg.language_threshold, f.language,
            [row_of[i].get("lang") for i in idx] if "lang" in columns else None,
            [per["language"][i] for i in idx] if "language" in per else None)))
    if f.max_paragraph_chars is not None:
        checks.append(("long_paragraph", lambda idx: [long_paragraph(plain[i], f.max_paragraph_chars) for i in idx]))
    if f.code_blocks:
        checks.append(("code_block", lambda idx: [has_code_block(plain[i]) and not row_of[i].get(f.code_column) for i in idx]))
    if f.max_repetition is not None:
        checks.append(("repetition", lambda idx: repetitive([plain[i] for i in idx], f.repetition_ngram, f.max_repetition)))
    why = first_reasons(len(comps), checks)
    for p in range(len(indices)):  # dedup and cap, per prompt, among the samples still alive
        alive = [p * N + j for j in range(N) if why[p * N + j] is None]
        for i, r in zip(alive, select([plain[i] for i in alive], [len(comps[i].token_ids) for i in alive],
                                      cfg.dedup_threshold, cfg.dedup_ngram, cfg.max_per_prompt, cfg.cap_mode)):
            why[i] = r
    kept = [{"prompt": row_of[i]["prompt"], "completion": texts[i], "answer": row_of[i].get("answer"),
             "reward": totals[i], "rewards": scores[i], "num_tokens": len(comps[i].token_ids),
             "finish_reason": comps[i].finish_reason, "prompt_index": indices[comps[i].prompt_index],
             "sample_index": i % N, "source_model": str(model_path)} for i in range(len(comps)) if why[i] is None]
    dropped: dict[str, int] = {}
    for r in why:
        if r is not None:
            dropped[r] = dropped.get(r, 0) + 1
    passes = [sum(fails_keep(scores[p * N + j], keep) is None for j in range(N)) for p in range(len(indices))]
    sums = {label: [sum(s for s in v if s is not None), sum(s is not None for s in v)] for label, v in per.items()}
    return kept, {"prompts": len(indices), "samples": len(comps), "kept": len(kept), "dropped": dropped,
                  "passes": passes, "prompts_with_kept": len({r["prompt_index"] for r in kept}), "reward_sums": sums}


def _write_json(path: Path, obj) -> None:
    """Write JSON through a temporary sibling and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _check_resume(shards: Path, meta: dict) -> None:
    """Shards on disk must come from this very config and model; clear the debris of a killed write."""
    shards.mkdir(parents=True, exist_ok=True)
    for p in [*shards.iterdir(), *shards.parent.iterdir()]:  # .shard-00003.tmp-*, .data.tmp-*, .stats.json.tmp-*
        debris = p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)  # atomic_dir's names
        if debris and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif debris:
            p.unlink(missing_ok=True)
    f = shards / "meta.json"
    if f.is_file() and json.loads(f.read_text()) != meta:
        raise ConfigError(f"{shards}: shards were sampled with another config or model; delete {shards.parent} "
                          f"or choose another output directory")
    if not f.is_file():
        _write_json(f, meta)


def _prompt_texts(rows: list[dict]) -> list[str]:
    return [prompt_text(r["prompt"]) for r in rows]


def run(cfg: RejectConfig, model_path: str, out_dir: Path, console: Console | None = None) -> Path:
    """The reject stage: shards under out_dir/shards/, then out_dir/data/train.{jsonl,parquet} and out_dir/stats.json
    (written last: it marks the stage done). Returns stats.json."""
    console = console or Console()
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)
    reward_set = reward_lib.RewardSet.from_specs([r.model_dump() for r in cfg.rewards])
    keep = keep_rule(cfg, reward_set.labels)
    order = reasons(keep)
    need_answer = any(r.name in ("accuracy", "cosine") for r in cfg.rewards)
    rows = load_rows(cfg.data, require_answer=need_answer)
    texts = _prompt_texts(rows)
    eval_texts = [t for d in cfg.decontaminate for t in _prompt_texts(load_rows(d, require_answer=False))]
    dirty = contaminated(texts, eval_texts, cfg.decontaminate_ngram)
    todo = [i for i in range(len(rows)) if not dirty[i]]
    if not todo:
        raise DataError(f"{cfg.data.source}: decontamination dropped all {len(rows)} prompts")
    shards = out_dir / "shards"
    rank, world = process_group(cfg.runtime)
    main = rank == 0
    if main:  # one rank checks the config and clears debris, before any rank writes
        _check_resume(shards, {"config": cfg.model_dump(mode="json"), "model": str(model_path)})
    barrier(world)
    n_shards = math.ceil(len(todo) / cfg.shard_size)
    names = [shards / f"shard-{s:05d}" for s in range(n_shards)]
    missing = [s for s in range(n_shards) if not (names[s] / "stats.json").is_file()]
    barrier(world)  # every rank saw the same shards on disk before any writes a new one
    if main and len(missing) < n_shards:
        console.print(f"\\[reject] resuming: {n_shards - len(missing)} of {n_shards} shards done")
    if main and world > 1:
        console.print(f"\\[reject] {world} processes share the {len(missing)} unfinished shards (round robin)")
    done = n_shards - len(missing)
    missing = missing[rank::world]  # this rank's shards; their seeds depend on the shard index only
    if missing:
        model, tok = load_frozen(model_path, cfg.runtime)  # runtime: device and dtype
        worker = make_worker(cfg.rollout, model, tok, model_path,
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)
        with progress(console) if main else contextlib.nullcontext() as bar:
            task = bar.add_task("reject", total=n_shards, completed=done, info="") if world == 1 else \
                bar.add_task("reject (rank 0's shards)", total=len(missing), info="") if main else None
            for s in missing:
                idx = todo[s * cfg.shard_size:(s + 1) * cfg.shard_size]
                kept, counts = sample_shard(cfg, worker, tok, reward_set, keep, rows, idx, s, model_path)

                def write(d: Path, kept=kept, counts=counts):
                    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
                    (d / "stats.json").write_text(json.dumps({**counts, "rank": rank}))  # rank: who sampled it

                atomic_dir(names[s], write)
                if main:
                    bar.update(task, advance=1, info=f"kept {counts['kept']}/{counts['samples']}")
        if hasattr(worker, "close"):
            worker.close()
    barrier(world)  # every shard is on disk
    if not main:
        barrier(world)  # ... and rank 0 has assembled them
        return out_dir / "stats.json"
    counts = [json.loads((d / "stats.json").read_text()) for d in names]
    kept = [json.loads(line) for d in names for line in (d / "rows.jsonl").read_text().splitlines()]
    stats = summarise(counts, [r["num_tokens"] for r in kept], order, sum(dirty), cfg, model_path, len(rows))
    if not kept:
        why = ", ".join(f"{r} dropped {n}" for r, n in stats["dropped"].items() if n)
        raise DataError(f"reject: no sample kept of {stats['samples']} ({why})")
    import datasets

    ds = datasets.Dataset.from_list(kept)
    atomic_dir(out_dir / "data", lambda d: (ds.to_json(str(d / "train.jsonl"), force_ascii=False),
                                              ds.to_parquet(str(d / "train.parquet"))))
    _write_json(out_dir / "stats.json", stats)
    console.print(f"\\[reject] kept {stats['kept']} of {stats['samples']} samples -> {out_dir / 'data'}")
    barrier(world)  # no rank returns before the dataset is in place
    return out_dir / "stats.json"
