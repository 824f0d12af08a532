"""Evaluation: sample k completions per held-out prompt and report pass@1 (mean over the k samples, as R1
reports it), cons@k (majority vote over the k extracted answers) and pass@k, plus format compliance."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

import rewards as reward_lib
from grpo.config import EvalConfig
from grpo.data import load_rows
from grpo.models import hf
from grpo.rollout import SamplingParams
from grpo.rollout.native import NativeWorker
from grpo.templates import render
from rewards.accuracy import extract_answer
from rewards._text import completion_text

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def last_number_correct(text: str, gold: str) -> float:
    """Format-blind check: is the last number in the text the gold number? Separates maths from format."""
    nums = _NUM.findall(text)
    try:
        return float(bool(nums) and float(nums[-1]) == float(gold))
    except ValueError:
        return float("nan")


def evaluate(cfg: EvalConfig, model_path: str, console: Console | None = None) -> dict[str, float]:
    """Metrics dict for the checkpoint at `model_path` on cfg.data."""
    console = console or Console()
    torch.manual_seed(cfg.seed)
    rows = load_rows(cfg.data)
    model, tok = hf.load(model_path)
    worker = NativeWorker(model, tok)
    prompts = [render(cfg.template, r["prompt"], tok) for r in rows]
    ids = tok(prompts, add_special_tokens=False).input_ids
    sp = cfg.sampling
    comps = worker.generate(ids, cfg.k, SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                                       max_tokens=sp.max_tokens, stop=list(sp.stop), seed=cfg.seed))
    reward_set = reward_lib.RewardSet.from_specs([r.model_dump() for r in cfg.rewards])
    src = [rows[c.prompt_index] for c in comps]
    columns = {k: [r.get(k) for r in src] for k in rows[0] if k != "prompt"}
    _, per = reward_set([c.text for c in comps], [prompts[c.prompt_index] for c in comps], **columns)
    acc = per.get("accuracy") or per[next(iter(per))]
    k = cfg.k
    out = {"problems": len(rows), "samples": len(comps)}
    correct = [[acc[i * k + j] for j in range(k)] for i in range(len(rows))]
    scored = [[x for x in row if x is not None] for row in correct]
    out["pass@1"] = sum(sum(r) / len(r) for r in scored if r) / max(1, sum(1 for r in scored if r))
    out[f"pass@{k}"] = sum(max(r) for r in scored if r) / max(1, sum(1 for r in scored if r))
    cons = []  # majority vote over all k samples; "no answer" is a candidate too, and scores 0 when it wins
    for i in range(len(rows)):
        answers = [extract_answer(completion_text(comps[i * k + j].text)) for j in range(k)]
        top = Counter(answers).most_common(1)[0][0]
        cons.append(0.0 if top is None or correct[i][0] is None else float(correct[i][answers.index(top)]))
    out[f"cons@{k}"] = sum(cons) / len(cons)
    for label, scores in per.items():
        if label != "accuracy":
            vals = [s for s in scores if s is not None]
            out[label] = sum(vals) / max(1, len(vals))
    out["last_number_acc"] = sum(last_number_correct(c.text, str(r["answer"])) for c, r in zip(comps, src)) / len(comps)
    out["mean_length"] = sum(len(c.token_ids) for c in comps) / len(comps)
    return out
