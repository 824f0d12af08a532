"""Peak memory and time of r1kit's fused_logprob vs log_softmax(hidden @ W.T).gather(...), forward + backward.

Shape (issue 4): T=8192 tokens, V=128k (131072) vocab, H=1024, fp32. Each variant runs in a fresh subprocess,
so peak memory is the child's peak resident set (getrusage ru_maxrss: it sees torch's allocations, which
tracemalloc does not), reported in total and above the RSS the inputs already took. The fused path also returns
the entropy; the baseline computes only the log-prob. Outputs (logp and d hidden) are checked to agree.
The last line is the fused/baseline ratio of peak memory.

    python bench/logprob.py [--tokens 8192] [--vocab 131072] [--hidden 1024] [--forward-only]
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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo.kernels.logprob import fused_logprob  # noqa: E402


def proc_bytes(path: str, key: str) -> int:
    """A 'Key:  N kB' line of a /proc file, in bytes (VmRSS of /proc/self/status, MemAvailable of /proc/meminfo)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(variant, T, V, H, forward_only, out_path):
    """Build inputs, run one variant once (forward [+ backward]), report time and peak RSS as JSON."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    targets = torch.randint(0, V, (T,), generator=g)
    hidden.requires_grad_(not forward_only)
    weight.requires_grad_(not forward_only)
    base = proc_bytes("/proc/self/status", "VmRSS")
    t0 = time.perf_counter()
    if variant == "fused":
        logp, _entropy = fused_logprob(hidden, weight, targets)
    else:
        logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None])[:, 0]
    t_fwd = time.perf_counter() - t0
    if not forward_only:
        logp.sum().backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"logp": logp.detach(), "dhidden": None if forward_only else hidden.grad}, out_path)
    print(json.dumps({"time": elapsed, "time_fwd": t_fwd, "peak": peak, "base": base}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--child", choices=["fused", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    T, V, H = args.tokens, args.vocab, args.hidden
    if args.child:
        return child(args.child, T, V, H, args.forward_only, args.out)

    logits_gb = T * V * 4 / 2**30
    need = (2 if args.forward_only else 3) * logits_gb + 2 * V * H * 4 / 2**30
    avail = proc_bytes("/proc/meminfo", "MemAvailable") / 2**30
    mode = "forward" if args.forward_only else "forward+backward"
    print(f"T={T} V={V} H={H} fp32, {mode}; one [T, V] fp32 logits tensor = {logits_gb:.1f} GiB; "
          f"baseline needs ~{need:.1f} GiB, {avail:.1f} GiB available; CPU, {torch.get_num_threads()} threads")
    if need > 0.9 * avail:
        sys.exit("not enough free memory for the baseline on this machine now; use smaller --tokens/--vocab")
    res, outs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("baseline", "fused"):
            path = os.path.join(tmp, f"{variant}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--tokens", str(T), "--vocab",
                   str(V), "--hidden", str(H), "--out", path] + (["--forward-only"] if args.forward_only else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            outs[variant] = torch.load(path)
    dlogp = (outs["fused"]["logp"] - outs["baseline"]["logp"]).abs().max().item()
    msg = f"max |logp diff| {dlogp:.1e}"
    if not args.forward_only:
        dh = outs["fused"]["dhidden"] - outs["baseline"]["dhidden"]
        msg += f", max |d hidden diff| {dh.abs().max().item():.1e}"
    print(msg)
    assert dlogp < 1e-3, "fused log-prob disagrees with the baseline"
    gib = 2**30
    print(f"{'variant':34s} {'time s':>8s} {'fwd s':>7s} {'peak RSS GiB':>13s} {'above inputs GiB':>17s}")
    names = {"baseline": "log_softmax(h @ W.T).gather", "fused": "r1kit fused_logprob (+ entropy)"}
    for k in ("baseline", "fused"):
        r = res[k]
        print(f"{names[k]:34s} {r['time']:8.2f} {r['time_fwd']:7.2f} {r['peak'] / gib:13.2f} "
              f"{(r['peak'] - r['base']) / gib:17.2f}")
    b, f = res["baseline"], res["fused"]
    print(f"time: fused / baseline = {f['time'] / b['time']:.2f}")
    print(f"peak memory above inputs: fused / baseline = {(f['peak'] - f['base']) / (b['peak'] - b['base']):.3f}")
    print(f"peak memory: fused / baseline = {f['peak'] / b['peak']:.3f} (goal <= 0.2)")


if __name__ == "__main__":
    main()
