"""Distillation steps in one run: r1kit (grpo/distill.py) vs TRL's GKDTrainer (trl.experimental.gkd) on the same
tiny teacher and student (the test suite's Llamas: teacher 64 wide x 2 layers, student 32 x 1, one tokenizer) and
the same batch, taking turns each round. TRL's side runs its own code unchanged: GKDTrainer.compute_loss (full [B, T, V] logits of both
models, generalized_jsd_loss) and, on-policy, GKDTrainer.generate_on_policy_outputs (HF generate) before it; it is
called as an unbound method on a namespace holding teacher_model and beta (no Trainer, dataset or accelerate
around it, so neither side pays for a framework). Both compute the JSD at beta 0.5; their losses are compared.

- kd: forward + backward of the loss on B rows of prompt + completion text; tokens/s = labelled tokens / time.
- on_policy: sample `--n` completions for each of `--prompts` prompts from the student, then forward + backward of
  the JSD on them (TRL's lambda = 1); tokens/s = sampled tokens / time. r1kit also runs `on_policy_loss: advantage`.
- memory (--vocab-mem, default 128k): the kd step on --mem-rows rows (16: about 480 labelled tokens, two chunks of
  the default chunk_size 256) with the same models' heads widened to V rows, each variant in a fresh subprocess;
  peak = the child's peak RSS (getrusage, sees torch's allocations) above what its models and batch took.

Prints tokens/s per variant, then the ratios last (goal: r1kit / TRL >= 1.5 tokens/s, memory <= 1/3).

    python bench/distill.py [--rows 16] [--prompts 8] [--n 4] [--max-tokens 64] [--rounds 5] [--vocab-mem 131072] [--mem-rows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import torch  # noqa: E402

from grpo import distill  # noqa: E402
from grpo.data import load_rows  # noqa: E402
from grpo.config import DataConfig, DistillConfig  # noqa: E402
from grpo.logprobs import TokenLogprobs  # noqa: E402
from grpo.models import hf  # noqa: E402
from grpo.rollout import SamplingParams, make_worker  # noqa: E402
from grpo.templates import render  # noqa: E402
from tests.helpers import tiny_checkpoint  # noqa: E402

BETA = 0.5
CHUNK = DistillConfig.model_fields["chunk_size"].default  # rows per chunk, as a run gets by default


def trl_gkd():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer


def models(tmp: Path, vocab: int | None = None):
    """(student, teacher, tokenizer); with `vocab`, both heads (untied) widened to that many rows, seeded."""
    t_path = tiny_checkpoint(tmp / "teacher", hidden=64, layers=2, seed=1, tie=False)
    s_path = tiny_checkpoint(tmp / "student", hidden=32, layers=1, seed=2, tie=False)
    teacher, tok = hf.load(str(t_path))
    student, _ = hf.load(str(s_path))
    teacher.eval().requires_grad_(False)
    if vocab:
        g = torch.Generator().manual_seed(3)
        for m in (teacher, student):
            head = m.get_output_embeddings()
            head.weight = torch.nn.Parameter(0.02 * torch.randn(vocab, head.in_features, generator=g),
                                             requires_grad=m is student)
    return student, teacher, tok


def kd_rows(tok, rows: int, max_length: int = 96):
    data = load_rows(DataConfig(source="synthetic:arith", num_examples=rows, completion_column="solution"),
                     require_answer=False)
    return distill.encode(data, tok, "r1_zero", max_length, "completion")


def trl_inputs(seqs, pad_id: int) -> dict:
    """The same rows as TRL's collator gives them: right-padded ids, attention mask, labels -100 off the completion."""
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id)
    labels = torch.full((len(seqs), L), -100)
    for b, (s, start) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        labels[b, start: len(s)] = torch.tensor(s[start:])
    attn = (torch.arange(L)[None] < torch.tensor([len(s) for s, _ in seqs])[:, None]).long()
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def kd_r1(student, teacher, seqs, pad_id):
    """r1kit's kd step (its training loop's calls): the mean JSD over the labelled positions, and their count."""
    total, n = distill.kd_step(distill.KDLoss(student), distill.Hidden(teacher), seqs, pad_id,
                               distill.divergence("jsd", BETA, 1.0), CHUNK, torch.device("cpu"))
    loss = total / n
    loss.backward()
    return loss.item(), n


def kd_trl(student, teacher, inputs):
    G = trl_gkd()
    shim = SimpleNamespace(teacher_model=teacher, beta=BETA, generalized_jsd_loss=G.generalized_jsd_loss)
    loss = G.compute_loss(shim, student, dict(inputs))
    loss.backward()
    return loss.item(), int((inputs["labels"][:, 1:] != -100).sum())


def best_times(fns: dict, rounds: int) -> dict:
    """{name: (fastest of `rounds` timed calls, its result)}; one warm-up each, then the variants take turns each
    round, so a shared machine's load falls on all of them alike."""
    out = {k: (float("inf"), fn()) for k, fn in fns.items()}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            r = fn()
            t = time.perf_counter() - t0
            if t < out[k][0]:
                out[k] = (t, r)
    return out


def child_mem(variant: str, vocab: int, rows: int) -> None:
    """One kd step at a wide vocabulary; prints peak RSS above the inputs as JSON."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher, tok = models(Path(tmp), vocab)
        seqs = kd_rows(tok, rows)
        inputs = trl_inputs(seqs, tok.pad_token_id)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        loss, _ = kd_r1(student, teacher, seqs, tok.pad_token_id) if variant == "r1" else kd_trl(student, teacher, inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "base": base, "loss": loss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab-mem", type=int, default=131072)
    ap.add_argument("--mem-rows", type=int, default=16)
    ap.add_argument("--child", choices=["r1", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_mem(args.child, args.vocab_mem, args.mem_rows)
    torch.set_num_threads(args.threads)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher, tok = models(Path(tmp))
        pad = tok.pad_token_id
        # kd: the same rows for both
        seqs = kd_rows(tok, args.rows)
        inputs = trl_inputs(seqs, pad)
        student.zero_grad()
        l_r1, n = kd_r1(student, teacher, seqs, pad)
        g_r1 = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        l_trl, _ = kd_trl(student, teacher, inputs)
        g_trl = [p.grad.clone() for p in student.parameters()]
        dg = max((a - b).abs().max().item() for a, b in zip(g_r1, g_trl))
        print(f"kd JSD(beta={BETA}) on {n} tokens: r1kit {l_r1:.6f}, TRL {l_trl:.6f} (|diff| {abs(l_r1 - l_trl):.1e}); "
              f"max |grad diff| {dg:.1e}")
        timed = best_times({"kd r1kit": lambda: (student.zero_grad(), kd_r1(student, teacher, seqs, pad))[1],
                            "kd TRL GKD": lambda: (student.zero_grad(), kd_trl(student, teacher, inputs))[1]}, args.rounds)
        res.update({k: r[1] / t for k, (t, r) in timed.items()})
        # on_policy: the student samples, then the JSD on its samples
        prompts = [render("r1_zero", r["prompt"]) for r in load_rows(DataConfig(num_examples=args.prompts))]
        prompt_ids = tok(prompts, add_special_tokens=False).input_ids
        worker = make_worker("native", student, tok, None)
        step = [0]

        def op_r1(form):
            cfg = DistillConfig(teacher="t", mode="on_policy", on_policy_loss=form, jsd_beta=BETA)
            step[0] += 1
            student.zero_grad()
            student.eval()
            comps = worker.generate(prompt_ids, args.n, SamplingParams(max_tokens=args.max_tokens, seed=step[0]))
            student.train()
            wide = form == "jsd"  # the training loop's modules: KDLoss / Hidden for jsd, TokenLogprobs else
            total, n, _ = distill.on_policy_step(
                distill.KDLoss(student) if wide else TokenLogprobs(student),
                distill.Hidden(teacher) if wide else TokenLogprobs(teacher), prompt_ids, comps, pad,
                distill.divergence("jsd", BETA, 1.0) if wide else None, cfg, torch.device("cpu"))
            (total / n).backward()
            return sum(len(c.token_ids) for c in comps)

        from transformers import GenerationConfig

        gen = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               pad_token_id=pad, eos_token_id=tok.eos_token_id)
        left = tok.padding_side
        tok.padding_side = "left"
        enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        tok.padding_side = left

        def op_trl():
            G = trl_gkd()
            student.zero_grad()
            ids, attn, labels = G.generate_on_policy_outputs(
                student, {"prompts": enc.input_ids.repeat_interleave(args.n, 0),
                          "prompt_attention_mask": enc.attention_mask.repeat_interleave(args.n, 0)}, gen)
            shim = SimpleNamespace(teacher_model=teacher, beta=BETA, generalized_jsd_loss=G.generalized_jsd_loss)
            G.compute_loss(shim, student, {"input_ids": ids, "attention_mask": attn, "labels": labels}).backward()
            return int((labels != -100).sum())

        timed = best_times({"on_policy jsd r1kit": lambda: op_r1("jsd"), "on_policy advantage r1kit":
                            lambda: op_r1("advantage"), "on_policy TRL GKD": op_trl}, args.rounds)
        res.update({k: ntok / t for k, (t, ntok) in timed.items()})
    # peak memory at a wide vocabulary, each in a fresh process
    mem = {}
    for v in ("trl", "r1"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--vocab-mem", str(args.vocab_mem),
               "--mem-rows", str(args.mem_rows)]
        mem[v] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"CPU, {args.threads} thread(s); kd: {args.rows} rows; on_policy: {args.prompts} prompts x {args.n} x "
          f"<= {args.max_tokens} tokens; fastest of {args.rounds}")
    for k, v in res.items():
        print(f"{k:28s} {v:10.0f} tokens/s")
    gib = 2**30
    for k, name in (("trl", "TRL GKD"), ("r1", "r1kit")):
        print(f"kd step at V={args.vocab_mem}, {args.mem_rows} rows, {name:8s}: peak above inputs "
              f"{(mem[k]['peak'] - mem[k]['base']) / gib:.2f} GiB (loss {mem[k]['loss']:.5f})")
    m_ratio = (mem["r1"]["peak"] - mem["r1"]["base"]) / max(1, mem["trl"]["peak"] - mem["trl"]["base"])
    print(f"ratios r1kit / TRL: kd tokens/s {res['kd r1kit'] / res['kd TRL GKD']:.2f}x, on_policy jsd tokens/s "
          f"{res['on_policy jsd r1kit'] / res['on_policy TRL GKD']:.2f}x (goal >= 1.5); "
          f"kd peak memory at V={args.vocab_mem} {m_ratio:.3f} (goal <= 0.33)")


if __name__ == "__main__":
    main()
