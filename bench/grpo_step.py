"""One GRPO step, r1kit against TRL's GRPOTrainer, in one run on the same inputs: the same tiny Qwen2 (built from a
config, random init, a BPE tokenizer trained here), the same addition prompts, G samples per prompt, completion
length, beta, learning rate and reward function. Both sample with plain torch on the CPU (r1kit's native engine,
TRL's transformers generate). Precision: each side at its best on this CPU. r1kit runs its `auto` runtime
(bf16 autocast, reference and sampler copy where the CPU has bf16 units, else fp32); TRL runs fp32 and, on such
a CPU, also its own bf16=True (autocast), and the faster of the two is the one compared. --compile compiles
both sides: r1kit's runtime.compile (each decoder layer), TRL's torch_compile (the Trainer's model). Prints each
run's seconds per step and completion tokens/s over the timed steps, r1kit's phases (generate / reference /
update / weight sync) with the update's share of the measured matmul peak, and the r1kit/TRL ratio last.

    python bench/grpo_step.py [--steps 10] [--warmup 2] [--prompts 8] [--group 8] [--max-tokens 128] [--beta 0.04]
                              [--precision auto|fp32] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402


def reward_len(completions, **kwargs):
    """The shared reward (spread on an untrained model, cheap): prefer completions of about 200 characters."""
    return [-abs(200 - len(c if isinstance(c, str) else c[0]["content"])) / 200 for c in completions]


def build(out_dir: str, hidden: int, layers: int, vocab: int) -> int:
    """A tiny Qwen2 (head_dim 64) and a local BPE tokenizer, saved as an HF directory; returns its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rollout_models import build_tokenizer

    tok = build_tokenizer(out_dir, vocab)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                      max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def prompts(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"<think> what is {a} + {b} ? the answer is", "answer": str(a + b)})
    return rows


def run_r1kit(path, rows, args, out_dir) -> list[dict]:
    """r1kit's GRPO loop (native sampler) for steps + warmup steps; returns its metrics rows."""
    from grpo import trainer
    from grpo.config import GRPOConfig

    data = os.path.join(out_dir, "rows.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = GRPOConfig(model=path, data={"source": data}, template=os.path.join(out_dir, "raw.jinja"),
                     rollout="native", group_size=args.group, prompts_per_step=args.prompts,
                     steps=args.warmup + args.steps, sampling={"temperature": 1.0, "max_tokens": args.max_tokens},
                     beta=args.beta, learning_rate=1e-5, micro_batch_size=args.prompts * args.group, loss_type="grpo",
                     rewards=[{"name": f"{os.path.abspath(__file__)}:reward_len"}], save_every=0,
                     runtime={"compile": args.compile, **({"mixed_precision": args.precision,
                                                           "reference_dtype": args.precision,
                                                           "sampler_dtype": args.precision}
                                                          if args.precision == "auto" else {})})
    trainer.train(cfg, path, Path(out_dir) / "r1kit")
    return [json.loads(line) for line in open(os.path.join(out_dir, "r1kit", "metrics.jsonl"))]


def run_trl(path, rows, args, out_dir, bf16: bool) -> list[tuple[float, float]]:
    """TRL's GRPOTrainer on the same model, prompts and settings, fp32 or bf16=True (autocast); returns (seconds,
    completion tokens) per step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    steps: list[list[float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append([time.perf_counter(), 0.0])

        def on_step_end(self, *a, **k):
            steps[-1][0] = time.perf_counter() - steps[-1][0]

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1][1] = logs["completions/mean_length"] * args.prompts * args.group

    cfg = GRPOConfig(output_dir=os.path.join(out_dir, f"trl{bf16:d}"), per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.max_tokens, beta=args.beta,
                     learning_rate=1e-5, max_steps=args.warmup + args.steps, logging_steps=1, report_to="none",
                     use_cpu=True, save_strategy="no", temperature=1.0, loss_type="grpo", scale_rewards="group",
                     shuffle_dataset=False, disable_dropout=True, dataloader_num_workers=0, seed=0,
                     # TRL 1.16 defaults to bf16=True and gradient_checkpointing=True; on a CPU without bf16 units
                     # bf16 emulates every GEMM (68 s a step on Zen1), so it runs only where the CPU has bf16 units.
                     # r1kit does not checkpoint, so TRL does not either (it would recompute the forward)
                     bf16=bf16, gradient_checkpointing=False, torch_compile=args.compile)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_list(rows * (args.warmup + args.steps)), callbacks=[Clock()])
    trainer.train()
    return [tuple(s) for s in steps]


def matmul_peak(n: int = 1024, reps: int = 5, dtype=torch.float32) -> float:
    """Best GFLOP/s of one [2n, n] @ [n, n] GEMM in `dtype` on this machine now."""
    a, b = torch.randn(2 * n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 4 * n**3 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto",
                    help="auto: each side's bf16 too where this CPU has bf16 units; fp32: both fp32 only")
    ap.add_argument("--compile", action="store_true",
                    help="both sides torch.compile'd: r1kit's runtime.compile, TRL's torch_compile (compiling falls "
                         "in the untimed steps)")
    args = ap.parse_args()
    from grpo.runtime import cpu_has_fast_bf16  # what r1kit's `auto` runtime asks too (grpo.accel.native_bf16)

    units = cpu_has_fast_bf16()
    bf16 = args.precision == "auto" and units
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        n_params = build(path, args.hidden, args.layers, 1024)
        with open(os.path.join(tmp, "raw.jinja"), "w") as f:
            f.write("{{ prompt }}")  # both sides see the prompt text as it is (TRL: a plain-text dataset)
        rows = prompts(args.prompts)
        print(f"tiny Qwen2 {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers), "
              f"{args.prompts} prompts x G={args.group} x {args.max_tokens} new tokens, beta {args.beta}, "
              f"{args.warmup} untimed + {args.steps} timed steps, torch threads {torch.get_num_threads()}, "
              f"bf16 units: {'yes' if units else 'no'}")
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = matmul_peak(dtype=dtype)
        r1 = run_r1kit(path, rows, args, tmp)[args.warmup:]
        trls = {name: run_trl(path, rows, args, tmp, on)[args.warmup:]
                for name, on in [("fp32", False)] + [("bf16", True)] * bf16}
        peak = max(peak, matmul_peak(dtype=dtype))
    B = args.prompts * args.group
    mean = lambda k: sum(m[k] for m in r1) / len(r1)  # noqa: E731
    r1_s = mean("time/step")
    r1_tok = sum(m["completions/mean_length"] * B for m in r1) / sum(m["time/step"] for m in r1)
    gen, ref, update, sync = mean("time/generate"), mean("time/ref"), mean("time/update"), mean("time/weight_sync")
    tokens = sum((m["completions/mean_length"] + 10) * B for m in r1) / len(r1)  # prompt ~10 tokens
    update_flops = 6 * n_params * tokens  # policy forward + backward
    ref_flops = 2 * n_params * tokens * (args.beta > 0)
    print(f"{'bf16' if bf16 else 'fp32'} matmul peak (best of before and after): {peak:.0f} GFLOP/s")
    trl_tok, compiled = {}, ", compiled" if args.compile else ""
    for name, trl in trls.items():
        trl_s = sum(s for s, _ in trl) / len(trl)
        trl_tok[name] = sum(t for _, t in trl) / sum(s for s, _ in trl)
        print(f"TRL GRPOTrainer ({name}{compiled}): {trl_s:6.2f} s/step, {trl_tok[name]:7.0f} completion tokens/s")
    print(f"r1kit (native, {args.precision}{compiled}): {r1_s:6.2f} s/step, {r1_tok:7.0f} completion tokens/s")
    print(f"r1kit phases per step: generate {gen:.2f} s, reference {ref:.2f} s ({ref_flops / 1e9:.0f} GFLOP, "
          f"{100 * ref_flops / max(ref, 1e-9) / 1e9 / peak:.0f}% of peak), update {update:.2f} s "
          f"({update_flops / 1e9:.0f} GFLOP, {100 * update_flops / update / 1e9 / peak:.0f}% of peak), "
          f"weight sync {sync:.3f} s")
    best = max(trl_tok, key=trl_tok.get)
    print(f"r1kit/trl completion tokens/s (TRL's faster run, {best}): {r1_tok / trl_tok[best]:.2f}x")


if __name__ == "__main__":
    main()
