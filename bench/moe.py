"""MoE layer forward+backward: r1kit's moe_ffn vs transformers' DeepseekV3MoE, same weights and inputs, one run.

Shape (issue 4): E=64 routed experts, top-6, hidden 512, moe_intermediate 256, 2 shared experts, 4096 tokens.
Every variant runs the whole DeepseekV3MoE block (router + routed experts + shared experts); only the routed
experts differ: transformers' `eager` backend (its default), its `grouped_mm` backend, and r1kit's moe_ffn
(the sorted torch path on CPU, Triton on a GPU). GFLOP/s counts the block's matmul FLOPs (forward x3 for
forward+backward) against the machine's matmul peak, measured here before, between and after the rounds
(the best of all). Variants run round-robin and each reports its fastest round (fair on a shared machine). As
`r1` does, the run first keeps glibc's freed large blocks for reuse (grpo/runtime.py); --glibc-default skips
that. On CPU, r1kit's fp32 expert loop is compiled C where it builds (grpo/kernels/cpu_moe.py); --cpu-c swiglu
keeps the loop in Python with only SwiGLU in C, --cpu-c off uses torch's ops throughout. The last line is r1kit's
speed-up over the faster transformers backend. On a CPU without bf16 units (grpo.runtime.cpu_has_fast_bf16)
the bf16 rows are skipped: torch emulates bf16 matmuls there, minutes per call. --peak-n shrinks the peak probe
(with --tokens, for a quick smoke run).

    python bench/moe.py [--tokens 4096] [--repeats 3] [--no-bf16] [--glibc-default] [--cpu-c loop|swiglu|off]
                        [--peak-n 2048]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpo.kernels.moe as moe_mod  # noqa: E402
from grpo.kernels.moe import moe_ffn  # noqa: E402
from grpo.runtime import cpu_has_fast_bf16, keep_freed_memory  # noqa: E402


def matmul_peak(dtype, device, n=2048, reps=6):
    """Best GFLOP/s of a square-ish GEMM ([2n, n] @ [n, n]) in this dtype: the roofline the MoE is held to."""
    a = torch.randn(2 * n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2 * n * n * n / best / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_moe(tokens, device, seed=0):
    """transformers DeepseekV3MoE at the issue's shape, weights ~ N(0, 0.02), router included."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=512, moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=6,
                           n_shared_experts=2, n_group=8, topk_group=4, norm_topk_prob=True,
                           routed_scaling_factor=2.5)
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
        moe.gate.e_score_correction_bias.normal_(0.0, 0.01)
    x = torch.randn(tokens, cfg.hidden_size)
    cot = torch.randn(tokens, cfg.hidden_size)
    return cfg, moe.to(device), x.to(device), cot.to(device)


def r1kit_forward(moe, x, impl=None):
    """The same block with its routed experts computed by r1kit's moe_ffn (what grpo/models calls)."""
    _, topk_weights, topk_ids = moe.gate(x)
    routed = moe_ffn(x, topk_ids, topk_weights, moe.experts.gate_up_proj, moe.experts.down_proj, impl=impl)
    return routed + moe.shared_experts(x)


def block_flops(cfg, tokens):
    """Matmul FLOPs of one forward+backward of the block (backward = 2x forward)."""
    H, I, K, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    routed = tokens * K * 2 * (H * 2 * I + I * H)
    shared = tokens * 2 * (H * 2 * I * cfg.n_shared_experts + I * cfg.n_shared_experts * H)
    router = tokens * 2 * H * E
    return 3 * (routed + shared + router)


def fwd_bwd(fn, moe, impl, x, cot):
    """One timed forward + backward with fresh grads; returns (seconds, out, grads)."""
    if impl is not None:
        moe.config._experts_implementation = impl
        moe.experts.config._experts_implementation = impl
    for p in moe.parameters():
        p.grad = None
    xr = x.detach().clone().requires_grad_()
    _sync(x.device)
    t0 = time.perf_counter()
    out = fn(moe, xr)
    out.backward(cot)
    _sync(x.device)
    dt = time.perf_counter() - t0
    grads = [xr.grad] + [p.grad for p in (moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight)]
    return dt, out.detach(), grads


def time_round_robin(variants, x, cot, repeats, peak=None, peak_n=2048):
    """Run the variants in turn, `repeats` rounds after one warm-up round, so that load from other processes on a
    shared machine hits all of them alike; reports each one's fastest round. peak: a dict {dtype: GFLOP/s} whose
    entries are raised by a short matmul-peak probe before each round, so the roofline sees the same machine."""
    best, results = {}, {}
    for r in range(repeats + 1):
        for dtype in peak or {}:
            peak[dtype] = max(peak[dtype], matmul_peak(dtype, x.device, peak_n, reps=2))
        for name, (fn, moe, impl) in variants.items():
            dt, out, grads = fwd_bwd(fn, moe, impl, x, cot)
            results[name] = (out, grads)
            if r > 0:
                best[name] = min(best.get(name, float("inf")), dt)
    return {k: (best[k],) + results[k] for k in variants}


def hf_forward(moe, x):
    return moe(x)


def bf16_skip_reason(device, no_bf16):
    """Why the bf16 rows are skipped, or None to run them."""
    if no_bf16:
        return "--no-bf16"
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return ("this CPU has no bf16 matmul units (no avx512_bf16/amx_bf16 in /proc/cpuinfo): torch emulates bf16 "
                "there, minutes per GEMM (R1KIT_CPU_BF16=1 runs them anyway)")
    return None


def max_rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--peak-n", type=int, default=2048, help="size n of the [2n, n] @ [n, n] matmul-peak probe")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds as they are")
    ap.add_argument("--cpu-c", choices=["loop", "swiglu", "off"], default="loop",
                    help="fp32 CPU: the expert loop in C (default), only SwiGLU in C, or torch ops throughout")
    args = ap.parse_args()
    kept = False if args.glibc_default else keep_freed_memory()
    moe_mod.CPU_C = args.cpu_c
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; freed large blocks kept for reuse (grpo/runtime.py): {kept}")
    if device.type == "cpu":
        lib, loop = moe_mod._c_kernels(torch.empty(0))  # what an fp32 CPU call of moe_ffn will run
        mode = "loop" if loop else "swiglu" if lib is not None else "off"
        print(f"fp32 CPU MoE in compiled C (grpo/kernels/cpu_moe.py): {mode}")
    skip16 = bf16_skip_reason(device, args.no_bf16)
    if skip16:
        print(f"bf16 rows skipped: {skip16}")
    peak32 = matmul_peak(torch.float32, device, args.peak_n)
    peak16 = None if skip16 else matmul_peak(torch.bfloat16, device, args.peak_n)
    print(f"matmul peak before the runs: fp32 {peak32:.0f} GFLOP/s"
          + ("" if skip16 else f", bf16 {peak16:.0f} GFLOP/s"))
    cfg, moe, x, cot = build_moe(args.tokens, device)
    flops = block_flops(cfg, args.tokens)
    print(f"block: T={args.tokens} E=64 top-6 H=512 I=256 shared=2; {flops / 1e9:.1f} GFLOP per forward+backward")

    path = "triton" if device.type == "cuda" else "torch"
    variants = {"transformers eager": (hf_forward, moe, "eager"),
                "transformers grouped_mm": (hf_forward, moe, "grouped_mm"),
                f"r1kit moe_ffn ({path})": (r1kit_forward, moe, None)}
    if device.type == "cuda":  # the torch path too, for comparison with the Triton one
        variants["r1kit moe_ffn (torch)"] = (lambda m, x: r1kit_forward(m, x, impl="torch"), moe, None)
    peaks = {torch.float32: peak32}
    rows = time_round_robin(variants, x, cot, args.repeats, peaks, args.peak_n)
    peak32 = max(peaks[torch.float32], matmul_peak(torch.float32, device, args.peak_n))  # load may have changed
    ref_out, ref_grads = rows["transformers eager"][1:]
    print(f"fp32 matmul peak (best of before, between rounds, after): {peak32:.0f} GFLOP/s")
    head = f"{'fwd+bwd s':>10s} {'GFLOP/s':>8s} {'% peak':>7s}"
    print(f"{'variant (fp32)':34s} {head}  max rel diff vs eager (out, grads)")
    for k, (t, out, grads) in rows.items():
        diffs = [max_rel_diff(out, ref_out)] + [max_rel_diff(g, r) for g, r in zip(grads, ref_grads)]
        print(f"{k:34s} {t:10.3f} {flops / t / 1e9:8.1f} {100 * flops / t / 1e9 / peak32:6.1f}%  "
              + " ".join(f"{d:.1e}" for d in diffs))
        assert max(diffs) < 1e-3, f"{k} disagrees with transformers eager"

    if not skip16:
        moe16 = copy.deepcopy(moe).bfloat16()
        x16, cot16 = x.bfloat16(), cot.bfloat16()
        peaks16 = {torch.bfloat16: peak16}
        rows16 = time_round_robin({"transformers grouped_mm": (hf_forward, moe16, "grouped_mm"),
                                   f"r1kit moe_ffn ({path})": (r1kit_forward, moe16, None)}, x16, cot16, args.repeats,
                                  peaks16, args.peak_n)
        (t_hf16, out_hf16, _), (t_r16, out_r16, _) = rows16.values()
        peak16 = max(peaks16[torch.bfloat16], matmul_peak(torch.bfloat16, device, args.peak_n))
        print(f"{'variant (bf16)':34s} {head}  max rel diff vs bf16 grouped_mm (out)")
        for k, t, out in (("transformers grouped_mm", t_hf16, out_hf16), (f"r1kit moe_ffn ({path})", t_r16, out_r16)):
            print(f"{k:34s} {t:10.3f} {flops / t / 1e9:8.1f} {100 * flops / t / 1e9 / peak16:6.1f}%  "
                  f"{max_rel_diff(out, out_hf16):.1e}")
        print(f"bf16: r1kit is {t_hf16 / t_r16:.2f}x transformers grouped_mm")

    t_r = rows[f"r1kit moe_ffn ({path})"][0]
    t_eager, t_gmm = rows["transformers eager"][0], rows["transformers grouped_mm"][0]
    print(f"r1kit vs transformers eager: {t_eager / t_r:.2f}x")
    best = "grouped_mm" if t_gmm < t_eager else "eager"
    print(f"r1kit vs fastest transformers backend ({best}, fp32): {min(t_eager, t_gmm) / t_r:.2f}x")


if __name__ == "__main__":
    main()
