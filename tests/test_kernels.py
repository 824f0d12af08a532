"""Kernels against their plain-torch references, forward and backward, on random shapes that are not multiples
of the block sizes. Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py).

Tolerances come from rounding-error analysis (tests/tolerance.py): 2 * u * (lam * sum_i sqrt(n_i) + roundings) times
the magnitude of the summed terms, elementwise, with the reduction lengths n_i of each computation and its magnitude
from the same computation on absolute values (MoE, SwiGLU) or a stated formula (RMSNorm, log-prob). Nothing is
tuned to one CPU: a vector width or summation order changes the error, never the bound. Results claimed bit for
bit (thread counts, the C loop's weight grads) are compared exactly.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import grpo.kernels.moe as moe_mod
from grpo.kernels import cbuild, cpu_moe
from grpo.kernels.logprob import fused_logprob, logprob_reference
from grpo.kernels.moe import align_blocks, moe_ffn, moe_ffn_triton
from grpo.kernels.rmsnorm import rms_norm, rms_norm_reference
from tolerance import LAM, assert_within, rounding_tol, unit_roundoff

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cc = pytest.mark.skipif(cbuild.compiler() is None, reason="needs a C compiler (cc, gcc or clang) on Linux")
# the C expert loop calls torch's MKL sgemm; test_cpu_moe_builds_where_a_compiler_is checks it is found exactly then
needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(),
                               reason="torch is not built with MKL: the loop needs its sgemm (SwiGLU alone is still C)")


def _moe_inputs(T, H, E, K, I, seed, dtype=torch.float32, empty_expert=True):
    """Random routing (distinct experts per token, optionally one expert never picked) and weights."""
    g = torch.Generator().manual_seed(seed)
    pool = E - 1 if empty_expert else E  # expert E-1 gets no tokens: exercises the empty-group paths
    ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=dtype)
    x = torch.randn(T, H, generator=g, dtype=dtype)
    wgu = torch.randn(E, 2 * I, H, generator=g, dtype=dtype) / H**0.5
    wd = torch.randn(E, H, I, generator=g, dtype=dtype) / I**0.5
    return x, ids, w, wgu, wd


def _fwd_bwd(fn, inputs, grad_idx, seed=0, absolute=False):
    """Run fn, backprop a fixed random cotangent, return (outputs, grads of inputs[grad_idx]). absolute=True runs
    it on |inputs| with |cotangent|: the magnitudes of every summed term, forward and backward."""
    if absolute:
        inputs = [t.abs() if t.is_floating_point() else t for t in inputs]
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    cot = [c.abs() for c in cot] if absolute else cot
    grads = torch.autograd.grad(outs, [leaves[i] for i in grad_idx], cot)
    return [o.detach() for o in outs], list(grads)


def _assert_close(got, want, tols):
    for i, (a, b, t) in enumerate(zip(got, want, tols, strict=True)):
        assert_within(a, b, t, f"result {i}")


# |silu(g)| <= silu(|g|) and |silu'(g)| <= silu'(|g|), so the expert chain run on absolute values bounds the
# magnitude of every term summed forward and backward. Reductions: gate/up and da over H, down over I, dx over 2I,
# each token's experts over K, weight grads over at most T rows; ~10 elementwise roundings (exp, divide, products).
MOE_ROUNDINGS = 10


def _moe_reductions(T, H, I, K):
    return (T, H, H, I, 2 * I, K)


def _moe_tols(inputs, grad_idx, T, H, I, K, reductions=None, roundings=MOE_ROUNDINGS, **kw):
    """Elementwise bounds for _fwd_bwd(moe_ffn, inputs, grad_idx)'s results, from the reference on |inputs|."""
    mag = _fwd_bwd(lambda *a: moe_ffn(*a, impl="reference"), inputs, grad_idx, absolute=True)
    red = _moe_reductions(T, H, I, K) if reductions is None else reductions
    return [rounding_tol(m, red, roundings, **kw) for m in mag[0] + mag[1]]


# ------------------------------------------------------------------ MoE


@pytest.mark.parametrize("cpu_c", ["loop", "swiglu", "off"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("T,H,E,K,I,seed", [(37, 40, 5, 2, 20, 0), (53, 25, 7, 3, 19, 1)])
def test_moe_torch_matches_reference(T, H, E, K, I, seed, threads, cpu_c, monkeypatch):
    """The expert loop on the calling thread alone, and split over 2 and 3 threads (each with its own [T, H]
    accumulator, summed at the end); the loop in C, only SwiGLU in C (where they build), and torch ops."""
    monkeypatch.setattr(moe_mod, "EXPERT_THREADS", threads)
    monkeypatch.setattr(moe_mod, "CPU_C", cpu_c)
    inputs = _moe_inputs(T, H, E, K, I, seed)
    ref = _fwd_bwd(lambda *a: moe_ffn(*a, impl="reference"), inputs, [0, 2, 3, 4])
    got = _fwd_bwd(lambda *a: moe_ffn(*a, impl="torch"), inputs, [0, 2, 3, 4])
    # bound: fp32 rounding of the expert chain (_moe_tols, MOE_ROUNDINGS)
    _assert_close(got[0] + got[1], ref[0] + ref[1], _moe_tols(inputs, [0, 2, 3, 4], T, H, I, K))
    assert got[1][3][E - 1].abs().max() == 0  # the expert nobody picked gets exactly zero grad
    again = _fwd_bwd(lambda *a: moe_ffn(*a, impl="torch"), inputs, [0, 2, 3, 4])
    assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], again[0] + again[1]))  # deterministic


@needs_cc
def test_moe_c_loop_is_the_same_for_any_thread_count(monkeypatch):
    """The C loop's threads take experts as they go, yet results are identical bit for bit on 1, 2 or 3 threads
    (each row has its own place, each token sums its K rows in a fixed order; every GEMM runs on one core); the
    weight and routing-weight grads, per expert and per row, are also bit for bit those of the loop in Python
    (the same sgemm on the same rows)."""
    T, H, E, K, I = 61, 40, 7, 3, 24
    inputs = _moe_inputs(T, H, E, K, I, seed=5)
    runs, threads_before = [], torch.get_num_threads()
    for cpu_c, threads in (("loop", 1), ("loop", 2), ("loop", 3), ("swiglu", 2)):
        monkeypatch.setattr(moe_mod, "CPU_C", cpu_c)
        monkeypatch.setattr(moe_mod, "EXPERT_THREADS", threads)
        torch.set_num_threads(1 if threads == 1 else threads_before)  # one expert thread: single-threaded GEMMs too
        try:
            out, grads = _fwd_bwd(lambda *a: moe_ffn(*a, impl="torch"), inputs, [0, 2, 3, 4])
        finally:
            torch.set_num_threads(threads_before)
        runs.append(out + grads)  # [out, dx, d topk_weights, dW_gate_up, dW_down]
    assert all(torch.equal(a, b) for run in runs[1:3] for a, b in zip(run, runs[0], strict=True))
    assert all(torch.equal(runs[3][i], runs[0][i]) for i in (2, 3, 4))
    # out and dx: the same rows, each token's K of them summed in another order: one K-term sum, no roundings
    _assert_close(runs[3][:2], runs[0][:2], _moe_tols(inputs, [0, 2, 3, 4], T, H, I, K, reductions=(K,),
                                                      roundings=0)[:2])


@pytest.mark.parametrize("cpu_c", ["loop", "swiglu", "off"])
@pytest.mark.parametrize("grad_idx", [[0], [0, 2], [2, 3, 4], [3], [4]])
def test_moe_torch_computes_only_the_grads_asked_for(grad_idx, cpu_c, monkeypatch):
    """Frozen inputs (e.g. experts frozen under LoRA) get no grad, the rest match the reference, and the skipped
    weight-grad GEMMs are not run: backward does 2-4 GEMMs per expert with rows, by what is asked."""
    monkeypatch.setattr(moe_mod, "EXPERT_THREADS", 1)
    monkeypatch.setattr(moe_mod, "CPU_C", cpu_c)
    T, H, E, K, I = 37, 40, 5, 2, 20
    inputs = _moe_inputs(T, H, E, K, I, seed=8)
    ref = _fwd_bwd(lambda *a: moe_ffn(*a, impl="reference"), inputs, grad_idx)
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    out = moe_ffn(*leaves, impl="torch")
    mm, calls, bwd = torch.mm, [], cpu_moe.expert_bwd
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    monkeypatch.setattr(cpu_moe, "expert_bwd", lambda *a: calls.extend([1] * bwd(*a)))  # the C loop's GEMM count
    grads = torch.autograd.grad(out, [leaves[i] for i in grad_idx],
                                torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
    _assert_close(list(grads), ref[1], _moe_tols(inputs, grad_idx, T, H, I, K)[1:])  # bound: the expert chain
    # per expert: da always; dW_down if asked; dh-side GEMMs: dW_gate_up if asked, dx if asked
    per_expert = 1 + (4 in grad_idx) + (3 in grad_idx) + (0 in grad_idx)
    assert len(calls) == per_expert * (E - 1)  # expert E-1 has no rows


@needs_cc
def test_cpu_moe_builds_where_a_compiler_is():
    """With a compiler present the fused pass must build and pass its self-check, not quietly fall back."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # load()'s fallback warning, if any, fails this test with its reason
        lib = cpu_moe.load()
    assert lib is not None
    assert (lib.sgemm is not None) == torch.backends.mkl.is_available()  # MKL builds run the whole loop in C


@needs_cc
@needs_mkl
@pytest.mark.parametrize("T,H,E,K,I,seed", [(1, 1, 2, 1, 1, 0), (37, 45, 6, 3, 19, 1), (130, 33, 9, 2, 70, 2)])
def test_cpu_moe_loop_matches_autograd(T, H, E, K, I, seed):
    """The C expert loop, forward and backward, against plain autograd over the same sorted rows; odd shapes (vector
    tails, one-row experts), an expert without rows, saturated gates."""
    lib = cpu_moe.load()
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])  # expert E-1: no rows
    order = torch.argsort(ids.reshape(-1), stable=True)
    bounds = torch.nn.functional.pad(torch.bincount(ids.reshape(-1), minlength=E).cumsum(0), (1, 0))
    wgu = torch.randn(E, 2 * I, H, generator=g) * 3 / H**0.5
    args = (torch.randn(T, H, generator=g), torch.randn(T, H, generator=g), order,
            torch.rand(T * K, 1, generator=g), bounds, wgu, torch.randn(E, H, I, generator=g) / I**0.5)
    got, want = cpu_moe.run_loop(lib, *args), cpu_moe.loop_reference(*args)
    mag = cpu_moe.loop_reference(*[t.abs() if t.is_floating_point() else t for t in args])  # see MOE_ROUNDINGS
    tols = [rounding_tol(m, _moe_reductions(T, H, I, K), MOE_ROUNDINGS) for m in mag]
    for a, b, t in zip(got, want, tols, strict=True):
        assert torch.isfinite(a).all()
        assert_within(a, b, t)
    assert got[2][E - 1].abs().max() == 0 and got[3][E - 1].abs().max() == 0  # zero grads, not stale memory


@needs_cc
@needs_mkl
def test_cpu_moe_loop_refuses_routing_out_of_range():
    """The loop indexes rows by token, fills per-expert scratch and sums rows by sorted place: a bad token id, too
    small a scratch or a bad place is an error before any C runs."""
    lib = cpu_moe.load()
    T, H, E, I, S = 4, 6, 2, 3, 8
    x, ws, wgu, wd = torch.randn(T, H), torch.rand(S, 1), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    tok, bounds, y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([0, 4, 8]), torch.empty(S, H)

    def run(tok, rows):
        nxt = torch.zeros(1, dtype=torch.int64)
        return cpu_moe.expert_fwd(lib, x, tok, ws, bounds, nxt, wgu, wd, torch.empty(S, 2 * I), y,
                                  cpu_moe.fwd_scratch(rows, H, I))

    assert run(tok, 4) == 4  # two GEMMs per expert
    with pytest.raises(ValueError, match="routing out of range"):
        run(tok.clone().index_fill_(0, torch.tensor([5]), T), 4)
    with pytest.raises(ValueError, match="routing out of range"):
        run(tok, 3)
    with pytest.raises(ValueError, match="int64"):
        run(tok.int(), 4)
    pos, out = torch.arange(S).view(T, 2), torch.empty(T, H)
    cpu_moe.combine(lib, y, pos, out, 0, T)
    torch.testing.assert_close(out, y.view(T, 2, H).sum(1))
    with pytest.raises(ValueError, match="combine out of range"):
        cpu_moe.combine(lib, y, pos.clone().fill_(S), out, 0, T)
    with pytest.raises(ValueError, match="combine out of range"):
        cpu_moe.combine(lib, y, pos, out, 0, T + 1)


@needs_cc
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 9])
def test_cpu_moe_combine_sums_each_tokens_rows_in_slot_order(K):
    """combine reads four rows at a time, yet adds them left to right in slot order: bit for bit the plain sum."""
    g = torch.Generator().manual_seed(K)
    T, H = 29, 45
    order = torch.randperm(T * K, generator=g)
    rows, pos, out = torch.randn(T * K, H, generator=g), cpu_moe.inverse(order).view(T, K), torch.empty(T, H)
    cpu_moe.combine(cpu_moe.load(), rows, pos, out, 0, T)
    want = rows[pos[:, 0]]
    for k in range(1, K):
        want = want + rows[pos[:, k]]
    assert torch.equal(out, want)


@needs_cc
@pytest.mark.parametrize("n,I,seed", [(1, 1, 0), (37, 45, 1), (130, 257, 2)])
def test_cpu_moe_matches_torch_ops(n, I, seed):
    """The C passes against torch's silu / silu_backward on odd shapes (vector tails) and saturated gates."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 2 * I, generator=g) * 4
    h[0, 0] = -200.0  # exp overflows to inf: silu and its slope must come out 0, not NaN
    w, da = torch.rand(n, 1, generator=g) + 0.1, torch.randn(n, I, generator=g)
    a, aw, dw, dh = torch.empty(n, I), torch.empty(n, I), torch.empty(n), torch.empty(n, 2 * I)
    lib = cpu_moe.load()
    cpu_moe.swiglu_fwd(lib, h, w, a)
    cpu_moe.swiglu_bwd(lib, h, da, w, aw, dw, dh)
    # dw sums I products; the rest is elementwise (exp, divide, up to 6 products): magnitudes from |inputs|
    mags = cpu_moe.reference(h.abs(), da.abs(), w.abs())
    for got, want, mag in zip((a, dw, aw, dh), cpu_moe.reference(h, da, w), mags, strict=True):
        assert torch.isfinite(got).all()
        assert_within(got, want, rounding_tol(mag, (I,), 8))


@needs_cc
def test_cpu_moe_refuses_rows_it_would_misread():
    """Raw pointers: a strided view or a wrong dtype is an error, not a silent misread."""
    lib, h, w = cpu_moe.load(), torch.randn(8, 10), torch.rand(8, 1)
    with pytest.raises(ValueError, match="contiguous torch.float32 CPU tensor of shape"):
        cpu_moe.swiglu_fwd(lib, h[::2], w[::2], torch.empty(4, 5))
    with pytest.raises(ValueError, match="float64"):
        cpu_moe.swiglu_fwd(lib, h.double(), w, torch.empty(8, 5))


_PROBE = """
import warnings, torch
from grpo.kernels import cpu_moe, moe_ffn
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = cpu_moe.load()
x, w = torch.randn(20, 12), torch.rand(20, 2)
ids = torch.stack([torch.randperm(4)[:2] for _ in range(20)])
wgu, wd = torch.randn(4, 16, 12) * 0.3, torch.randn(4, 12, 8) * 0.3
diff = (moe_ffn(x, ids, w, wgu, wd, impl="torch") - moe_ffn(x, ids, w, wgu, wd, impl="reference")).abs()
mag = moe_ffn(x.abs(), ids, w, wgu.abs(), wd.abs(), impl="reference")  # every summed term's magnitude
print("loaded" if lib is not None else "fallback", f"{(diff / mag).max().item():.3e}",
      "|".join(str(c.message) for c in caught))
"""
_PROBE_TOL = rounding_tol(1.0, _moe_reductions(20, 12, 8, 2), MOE_ROUNDINGS)  # the probe's |diff| / magnitude


def _probe(tmp_path, **env):
    """Load the C SwiGLU in a fresh interpreter with this environment; returns its one printed line, split:
    state, the largest |torch - reference| / magnitude of the MoE (bounded by _PROBE_TOL), warnings."""
    full = {**os.environ, "R1KIT_CACHE_DIR": str(tmp_path / "cache"), **env}
    r = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return (r.stdout.strip().split(" ", 2) + [""])[:3]


@needs_cc
def test_cpu_moe_builds_once_into_its_cache(tmp_path):
    """First process compiles into R1KIT_CACHE_DIR; a second one loads the same file without rebuilding."""
    state, diff, _ = _probe(tmp_path)
    assert state == "loaded" and float(diff) <= _PROBE_TOL
    (so,) = (tmp_path / "cache" / "kernels").glob("moe-*.so")
    before = so.stat().st_mtime_ns
    assert _probe(tmp_path)[0] == "loaded"
    assert so.stat().st_mtime_ns == before and list(so.parent.iterdir()) == [so]  # no rebuild, no leftovers


def test_cpu_moe_without_a_compiler_falls_back_to_torch_ops(tmp_path):
    """No compiler (a real missing binary, not a mock): one warning saying so, and the MoE still matches."""
    state, diff, warning = _probe(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert state == "fallback" and float(diff) <= _PROBE_TOL
    assert "compiled C kernels of the CPU MoE are off" in warning and "no-such-cc" in warning
    state, _, warning = _probe(tmp_path, R1KIT_CPU_KERNELS="0")
    assert state == "fallback" and warning == ""  # switched off on purpose: no warning


def test_moe_torch_gradcheck_float64():
    x, ids, w, wgu, wd = _moe_inputs(9, 6, 4, 2, 5, seed=2, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, wgu, wd)]
    assert torch.autograd.gradcheck(lambda x, w, a, b: moe_ffn(x, ids, w, a, b, impl="torch"), args)


@pytest.mark.parametrize("T,H,E,K,I,seed", [(37, 40, 5, 2, 20, 0), (29, 33, 4, 3, 18, 3)])
def test_moe_triton_matches_reference(T, H, E, K, I, seed):
    inputs = _moe_inputs(T, H, E, K, I, seed)
    ref = _fwd_bwd(lambda *a: moe_ffn(*a, impl="reference"), inputs, [0, 2, 3, 4])
    # 16-wide blocks: several row blocks per expert, several k-steps, ragged edges on every dim
    got = _fwd_bwd(lambda *a: moe_ffn_triton(*a, block_m=16, block_n=16, block_k=16), inputs, [0, 2, 3, 4])
    # bound: fp32 rounding of the expert chain; Triton's block sums are one more summation order
    _assert_close(got[0] + got[1], ref[0] + ref[1], _moe_tols(inputs, [0, 2, 3, 4], T, H, I, K))


@pytest.mark.parametrize("grad_idx", [[0], [2, 3]])
def test_moe_triton_computes_only_the_grads_asked_for(grad_idx):
    T, H, E, K, I = 29, 33, 4, 3, 18
    inputs = _moe_inputs(T, H, E, K, I, seed=9)
    ref = _fwd_bwd(lambda *a: moe_ffn(*a, impl="reference"), inputs, grad_idx)
    got = _fwd_bwd(lambda *a: moe_ffn_triton(*a, block_m=16, block_n=16, block_k=16), inputs, grad_idx)
    # bound: as above
    _assert_close(got[0] + got[1], ref[0] + ref[1], _moe_tols(inputs, grad_idx, T, H, I, K))


def test_align_blocks_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([[0, 2], [2, 1], [0, 2], [2, 0]])
    slots, block_expert, poff = align_blocks(ids, num_experts=4, block_m=2)
    assert poff.tolist() == [0, 4, 6, 10, 10]  # counts 3, 1, 4, 0 padded to 4, 2, 4, 0
    assert block_expert.tolist() == [0, 0, 1, 2, 2]
    flat = ids.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        blk = slots[2 * b : 2 * b + 2]
        assert (flat[blk[blk >= 0]] == e).all()
    assert sorted(slots[slots >= 0].tolist()) == list(range(8))


def test_moe_layout_matches_transformers_deepseek_v3_experts():
    """Same weights in transformers' DeepseekV3Experts (eager backend) give the same output and grads."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    T, H, E, K, I = 31, 32, 6, 3, 24
    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "eager"
    hf = DeepseekV3Experts(cfg)
    x, ids, w, wgu, wd = _moe_inputs(T, H, E, K, I, seed=4)
    with torch.no_grad():
        hf.gate_up_proj.copy_(wgu)
        hf.down_proj.copy_(wd)
    xr = x.clone().requires_grad_()
    want = hf(xr, ids, w)
    want.square().sum().backward()
    xs, a, b = (t.clone().requires_grad_() for t in (x, wgu, wd))
    got = moe_ffn(xs, ids, w, a, b, impl="torch")
    got.square().sum().backward()
    # magnitudes: the chain on absolute values with the cotangent 2|out| of square().sum() (see MOE_ROUNDINGS)
    xm, am, bm = (t.abs().requires_grad_() for t in (x, wgu, wd))
    mag = moe_ffn(xm, ids, w.abs(), am, bm, impl="reference")
    mag.backward(2 * mag.detach())
    tols = [rounding_tol(m, _moe_reductions(T, H, I, K), MOE_ROUNDINGS) for m in (mag, xm.grad, am.grad, bm.grad)]
    _assert_close([got, xs.grad, a.grad, b.grad], [want, xr.grad, hf.gate_up_proj.grad, hf.down_proj.grad], tols)


def test_moe_torch_bf16_close_to_fp32_reference():
    """bf16 forward and backward (SwiGLU and sums in fp32 inside) stay within bf16's rounding of the fp32
    reference: every stored bf16 value on a term's path (inputs, cotangent, h, a, y, out, da, dh, dx, dW: at most
    14) rounds once, each by at most u_bf16 = 2^-8 relative (worst case), on top of fp32's summation error."""
    T, H, E, K, I = 41, 48, 6, 2, 32
    x, ids, w, wgu, wd = _moe_inputs(T, H, E, K, I, seed=5)
    cot = torch.randn(T, H, generator=torch.Generator().manual_seed(6))

    def run(impl, dtype, absolute=False):
        leaves = [(t.abs() if absolute else t).to(dtype).detach().requires_grad_() for t in (x, w, wgu, wd)]
        out = moe_ffn(leaves[0], ids, leaves[1], leaves[2], leaves[3], impl=impl)
        out.backward((cot.abs() if absolute else cot).to(dtype))
        return [out.detach()] + [t.grad for t in leaves]

    want, got = run("reference", torch.float32), run("torch", torch.bfloat16)
    mags = run("reference", torch.float32, absolute=True)
    assert all(t.dtype == torch.bfloat16 for t in got)
    for i, (g, r, m) in enumerate(zip(got, want, mags)):
        tol = rounding_tol(m, (), 14, torch.bfloat16, sides=1) + rounding_tol(m, _moe_reductions(T, H, I, K), 10)
        assert_within(g.float(), r, tol, f"bf16 result {i}")


def test_moe_dispatch_uses_torch_path_on_cpu():
    x, ids, w, wgu, wd = _moe_inputs(5, 8, 3, 2, 4, seed=6)
    out = moe_ffn(x.requires_grad_(), ids, w, wgu, wd)
    assert type(out.grad_fn).__name__ == "_SortedMoEBackward"


@needs_cuda
def test_moe_triton_on_cuda_matches_reference():
    inputs = [t.cuda() for t in _moe_inputs(300, 256, 8, 2, 128, seed=7)]
    torch.backends.cuda.matmul.allow_tf32 = False
    want = moe_ffn(*inputs, impl="reference")
    got = moe_ffn(*inputs)  # dispatches to Triton on CUDA
    assert type(got.grad_fn).__name__ in ("_TritonMoEBackward", "NoneType")
    # tl.dot may use TF32 on the GPU (u = 2^-11): 2^-11 * 8 * sqrt(256 + 128) ~ 8e-3 relative to the magnitude
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ RMSNorm


def _rms_tols(x, w, dy, eps=1e-6, roundings=10):
    """Bounds for rms_norm's [y, dx, dw] with y = x * r * w, r = rsqrt(mean(x^2) + eps): the mean (D terms) sets
    r, and dx = r*w*dy - x*r^3*mean(x*w*dy) sums D terms more; dw sums the rows. Magnitudes: each term's |.|."""
    x, w, dy = x.double(), w.double(), dy.double()
    D, rows = x.shape[-1], x.numel() // x.shape[-1]
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    mag_y = x.abs() * r * w.abs()
    mag_dx = r * (w * dy).abs() + x.abs() * r**3 * (x * w * dy).abs().mean(-1, keepdim=True)
    mag_dw = (dy * x).abs().mul(r).reshape(rows, D).sum(0)
    return [rounding_tol(m, (D, D, D, rows), roundings) for m in (mag_y, mag_dx, mag_dw)]


@pytest.mark.parametrize("shape", [(3, 7, 45), (5, 130)])
def test_rms_norm_triton_matches_reference(shape):
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(*shape, generator=g), torch.randn(shape[-1], generator=g)
    ref = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6, impl="torch"), (x, w), [0, 1])
    got = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6, impl="triton"), (x, w), [0, 1])
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # _fwd_bwd's cotangent
    _assert_close(got[0] + got[1], ref[0] + ref[1], _rms_tols(x, w, dy))  # bound: D-term means, rsqrt, products


def test_rms_norm_triton_bf16_returns_input_dtype():
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(6, 70, generator=g).bfloat16(), torch.randn(70, generator=g)
    got = rms_norm(x, w, 1e-6, impl="triton")
    assert got.dtype == torch.bfloat16
    want = rms_norm_reference(x, w, 1e-6)
    # both compute in fp32 and round once to bf16: where the fp32 values straddle a rounding boundary the two
    # differ by one bf16 ulp (at most eps_bf16 * |value|), plus the fp32 difference itself
    tol = torch.finfo(torch.bfloat16).eps * want.float().abs() + _rms_tols(x.float(), w, torch.zeros_like(w))[0]
    assert_within(got.float(), want.float(), tol)


def test_rms_norm_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    hf = DeepseekV3RMSNorm(45, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(45))
    x = torch.randn(4, 9, 45)
    with torch.no_grad():
        assert_within(rms_norm(x, hf.weight, 1e-6), hf(x), _rms_tols(x, hf.weight, torch.zeros_like(x))[0])


# ------------------------------------------------------------------ fused log-prob


def _logprob_inputs(N, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.25
    targets = torch.randint(0, V, (N,), generator=g)
    targets[1] = -100  # ignored position
    return hidden, weight, targets


def _logprob_tols(h, w, t, temp, chunk, cot_seed=0, entropy_grad=True):
    """Bounds for fused_logprob's [logp, entropy, d hidden, d weight] against the reference (two chunkings):
    each logit is an H-term dot product (error e_z, from its row's largest |h|.|w| magnitude S); lse is the log of a
    V-term sum of positive exps, rescaled once per chunk (e_lse); logp = z_t - lse; entropy = lse - E_p[z], whose
    p carry relative error e_z + e_lse; dz = g*(onehot - p) - g_ent*p*(z - E_p[z]) feeds dh = dz @ W (V terms) and
    dW = dz.T @ h (N terms), with the cotangents _fwd_bwd draws."""
    u, (N, H), V = unit_roundoff(torch.float32), h.shape, w.shape[0]
    chunks = -(-V // chunk)
    h64, w64 = h.double(), w.double()
    z = h64 @ w64.T / temp  # 'nh,vh->nv'
    S = (h64.abs() @ w64.abs().T / temp).max(1, keepdim=True).values  # [N, 1]
    e_z = u * (LAM * H**0.5 + 2) * S
    e_lse = e_z + u * (LAM * V**0.5 + 3 + 2 * chunks)
    logp, valid = torch.log_softmax(z, -1), (t >= 0)[:, None]
    p, onehot = logp.exp(), torch.nn.functional.one_hot(t.clamp_min(0), V).double()
    tol_logp = 2 * (e_z + e_lse + u * (logp * onehot).sum(1, keepdim=True).abs()) * valid
    tol_ent = 2 * (e_lse + e_z + (e_z + e_lse + u * LAM * V**0.5) * S)
    gen = torch.Generator().manual_seed(cot_seed)
    g = torch.randn(N, generator=gen).double()[:, None].abs() * valid
    ge = torch.randn(N, generator=gen).double()[:, None].abs() if entropy_grad else torch.zeros(N, 1).double()
    e_rel = e_z + e_lse  # the relative error of each p: the absolute error of log p
    mag_dz = g * (onehot + p) + ge * p * (z.abs() + S)
    e_dz = g * p * e_rel + ge * p * ((z.abs() + S) * e_rel + 2 * e_z + u * LAM * V**0.5 * S) + 3 * u * mag_dz
    wa, ha = w64.abs() / temp, h64.abs() / temp
    tol_dh = 2 * (e_dz @ wa + u * (LAM * V**0.5 + 1) * (mag_dz @ wa))
    tol_dw = 2 * (e_dz.T @ ha + u * (LAM * N**0.5 + 1) * (mag_dz.T @ ha))
    return [tol_logp[:, 0], tol_ent[:, 0], tol_dh, tol_dw]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("N,H,V,chunk,temp", [(13, 24, 301, 64, 0.7), (9, 40, 97, 97, 1.0), (17, 16, 250, 33, 1.3)])
def test_fused_logprob_matches_reference(impl, N, H, V, chunk, temp):
    inputs = _logprob_inputs(N, H, V, seed=N)
    ref = _fwd_bwd(lambda h, w, t: logprob_reference(h, w, t, temp), inputs, [0, 1])
    got = _fwd_bwd(lambda h, w, t: fused_logprob(h, w, t, temp, chunk_size=chunk, impl=impl), inputs, [0, 1])
    tols = _logprob_tols(*inputs, temp, chunk)  # bound: H-term logits, V-term lse, chunk merges
    _assert_close(got[0] + got[1], ref[0] + ref[1], tols)
    assert got[0][0][1] == 0  # ignored target
    assert (got[0][1] > 0).all() and (got[0][1] <= torch.log(torch.tensor(float(V))) + tols[1]).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_logprob_grad_of_logp_alone(impl):
    """Entropy unused in the loss: backward skips its terms and still matches the reference."""
    h, w, t = _logprob_inputs(10, 24, 130, seed=12)
    ref = _fwd_bwd(lambda a, b: logprob_reference(a, b, t, 0.9)[0], (h, w), [0, 1])
    got = _fwd_bwd(lambda a, b: fused_logprob(a, b, t, 0.9, chunk_size=48, impl=impl)[0], (h, w), [0, 1])
    tols = _logprob_tols(h, w, t, 0.9, 48, entropy_grad=False)  # bound: as above, no entropy term
    _assert_close(got[0] + got[1], ref[0] + ref[1], tols[:1] + tols[2:])


def test_fused_logprob_result_independent_of_chunk_size():
    h, w, t = _logprob_inputs(11, 32, 200, seed=10)
    a = fused_logprob(h, w, t, chunk_size=7)
    b = fused_logprob(h, w, t, chunk_size=200)
    _assert_close(a, b, _logprob_tols(h, w, t, 1.0, 7)[:2])  # bound: each chunking within _logprob_tols


@needs_cuda
def test_fused_logprob_on_cuda_matches_reference():
    h, w, t = (x.cuda() for x in _logprob_inputs(64, 128, 5000, seed=11))
    got = fused_logprob(h, w, t, chunk_size=1024)
    want = logprob_reference(h, w, t)
    for a, b in zip(got, want):  # cuBLAS may use TF32 (u = 2^-11): 2^-11 * 8 * sqrt(128) ~ 4e-3 of |logits| ~ 2
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- the native sampler's C decoding attention


def _decode_case(B, H, R, T, D, cap, seed, mask_kind):
    """q [B, H, R, D] and key/value views [:, :, :T] of a [B, H, cap, D] buffer (the sampler's cache layout)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, R, D, generator=gen)
    kbuf, vbuf = torch.randn(B, H, cap, D, generator=gen) * 2, torch.randn(B, H, cap, D, generator=gen)
    mask = None
    if mask_kind == "padding":  # left padding on some rows, as the sampler's additive bias has it
        full = torch.zeros(B, 1, 1, cap)
        full[0, ..., : T // 2] = float("-inf")
        full[-1, ..., :1] = float("-inf")
        mask = full[..., :T]
    elif mask_kind == "broadcast":
        mask = torch.randn(1, 1, 1, cap, generator=gen)[..., :T]
    return q, kbuf[:, :, :T], vbuf[:, :, :T], mask


@needs_cc
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["padding", "broadcast", "none"])
@pytest.mark.parametrize("B,H,R,T,D,cap,seed", [(3, 2, 4, 37, 40, 50, 0), (5, 1, 1, 3, 64, 3, 1),
                                                 (2, 4, 2, 130, 32, 140, 2)])
def test_decode_attention_matches_float64(B, H, R, T, D, cap, seed, mask_kind, kv_dtype):
    """fp32 and bf16 caches alike: the kernel widens bf16 exactly, so the float64 reference reads the same values
    and the bound is fp32's."""
    from grpo.kernels import cpu_attention

    q, k, v, mask = _decode_case(B, H, R, T, D, cap, seed, mask_kind)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    scale = D**-0.5
    got = cpu_attention.decode(q, k, v, mask, scale)
    assert got is not None, "the kernel should take an fp32 query and a strided fp32 or bf16 cache on CPU"
    m64 = None if mask is None else mask.double()
    want = cpu_attention.reference(q.double(), k.double(), v.double(), m64, scale)
    # scores: dots of D terms (error <= lam sqrt(D) u scale sum|q k|); softmax moves each output by at most
    # 2 max|d score| times sum_t p_t |v_t|; the weighted sum adds T terms, exp/normalise a few roundings (fp32
    # against float64: one side rounds)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale + (0 if m64 is None else m64)
    p = torch.softmax(s, -1)
    mag = torch.matmul(p, v.double().abs())  # [B, H, R, D]
    score_mag = (torch.matmul(q.double().abs(), k.double().abs().transpose(-1, -2)) * scale).amax(-1, keepdim=True)
    u = unit_roundoff(torch.float32)
    tol = u * (2 * LAM * D**0.5 * score_mag + LAM * T**0.5 + 8) * mag
    assert_within(got, want, tol, f"decode attention {B, H, R, T, D} mask={mask_kind}")


@needs_cc
def test_decode_attention_is_the_same_for_any_thread_count():
    from grpo.kernels import cpu_attention

    q, k, v, mask = _decode_case(7, 2, 2, 45, 32, 60, 3, "padding")
    lib = cpu_attention.load()
    one = cpu_attention._run(lib, q, k, v, mask, 0.2, threads=1)
    assert all(torch.equal(one, cpu_attention._run(lib, q, k, v, mask, 0.2, threads=n)) for n in (2, 3, 7))


def test_decode_attention_declines_what_it_cannot_read():
    from grpo.kernels import cpu_attention

    q, k, v, mask = _decode_case(2, 2, 2, 9, 16, 12, 4, "padding")
    assert cpu_attention.decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25) is None  # an fp32 query
    assert cpu_attention.decode(q, k, v.bfloat16(), None, 0.25) is None  # keys and values of one dtype
    assert cpu_attention.decode(q, k.half(), v.half(), None, 0.25) is None  # fp32 or bf16 caches only
    assert cpu_attention.decode(q, k, v, mask.bool(), 0.25) is None  # boolean masks stay with sdpa
    assert cpu_attention.decode(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, mask, 0.25) is None
    assert cpu_attention.decode(q[:, :1], k, v, mask, 0.25) is None  # shapes that disagree: never read past them
