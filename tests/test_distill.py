"""Distillation (grpo/distill.py): the chunked divergences against float64 formulas, the three modes end to end on
a tiny teacher and student that share a tokenizer, the reverse KL falling on-policy, and the vocabulary check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from grpo import algo
from grpo.distill import chunked_divergence, divergence
from tests.helpers import tiny_checkpoint
from tests.tolerance import LAM, assert_within, unit_roundoff

# ---------------------------------------------------------------- numerics: fp32 chunked vs float64 direct


def _inputs(N=37, V=300, Hs=24, Ht=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, Hs, generator=g), 0.5 * torch.randn(V, Hs, generator=g),
            torch.randn(N, Ht, generator=g), 0.4 * torch.randn(V, Ht, generator=g))


def _logp_error(h, w, T):
    """Per-row bound E on |log p_fp32 - log p_exact| for p = softmax(h @ w.T / T): the logits' dot products of
    length H (2x: a shift of the logits moves log p through z_v and through the logsumexp), plus the logsumexp's
    V-term sum, exp/log/subtraction roundings on magnitudes up to 1 + max|z| + |lse|."""
    u, H, V = unit_roundoff(torch.float32), h.shape[1], w.shape[0]
    h64, w64 = h.double(), w.double()
    z = h64 @ w64.T / T
    a = LAM * math.sqrt(H) * u * (h64.abs() @ w64.abs().T).amax(1) / T + u * z.abs().amax(1)
    lse = torch.logsumexp(z, 1)
    return 2 * a + u * (LAM * math.sqrt(V) + 6) * (1 + z.abs().amax(1) + lse.abs()), torch.log_softmax(z, 1)


def _row_tol(E, mag, logps, V):
    """|divergence_fp32 - exact| per row: each log-ratio is off by at most 3E (two log p's, or log p and log m);
    the weights p = exp(log p) by E + u (1 + |log p|) relative; the V-term sums by LAM sqrt(V) u relative."""
    u = unit_roundoff(torch.float32)
    biggest = torch.stack([lp.abs().amax(1) for lp in logps]).amax(0)
    return 3 * E + (E + u * (1 + biggest) + (LAM * math.sqrt(V) + 3) * u) * mag


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_forward_kl_matches_float64(T):
    h_s, w_s, h_t, w_t = _inputs()
    N, V = h_s.shape[0], w_s.shape[0]
    E_s, ls = _logp_error(h_s, w_s, T)
    E_t, lt = _logp_error(h_t, w_t, T)
    E = torch.maximum(E_s, E_t)
    ps, pt = ls.exp(), lt.exp()
    want = (pt * (lt - ls)).sum(1)  # [N], float64 direct
    tol = _row_tol(E, (pt * (lt - ls).abs()).sum(1), (ls, lt), V)
    got = algo.forward_kl(h_s @ w_s.T, h_t @ w_t.T, T)
    assert_within(got, want, tol, "forward KL rows")
    # chunked over rows (5 chunks, the last partial), with gradients formed in forward
    hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    total = chunked_divergence(hs, ws, h_t, w_t, divergence("forward_kl", 0.5, T), chunk_size=8)
    u = unit_roundoff(torch.float32)
    assert_within(total, want.sum(), tol.sum() + LAM * math.sqrt(N) * u * want.abs().sum(), "chunked forward KL")
    total.backward()
    dz = (ps - pt) / T  # d sum KL / d z_s, exact
    w64, h64 = w_s.double(), h_s.double()
    eps = ((ps + pt) * (E + 2 * u)[:, None]) / T  # |error| of each dz entry
    tol_h = eps @ w64.abs() + LAM * math.sqrt(V) * u * (dz.abs() @ w64.abs())
    tol_w = eps.T @ h64.abs() + LAM * math.sqrt(N) * u * (dz.abs().T @ h64.abs())
    assert_within(hs.grad, dz @ w64, tol_h, "d KL / d hidden")
    assert_within(ws.grad, dz.T @ h64, tol_w, "d KL / d head")
    assert not torch.equal(ws.grad, torch.zeros_like(ws.grad))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_direct_formula(beta):
    h_s, w_s, h_t, w_t = _inputs(seed=1)
    V = w_s.shape[0]
    E_s, ls = _logp_error(h_s, w_s, 1.0)
    E_t, lt = _logp_error(h_t, w_t, 1.0)
    ps, pt = ls.exp(), lt.exp()
    m = beta * pt + (1 - beta) * ps  # the mixture, in probabilities
    want = beta * (pt * (pt / m).log()).sum(1) + (1 - beta) * (ps * (ps / m).log()).sum(1)
    mag = beta * (pt * (pt / m).log().abs()).sum(1) + (1 - beta) * (ps * (ps / m).log().abs()).sum(1)
    tol = _row_tol(torch.maximum(E_s, E_t), mag, (ls, lt), V)
    assert_within(algo.generalized_jsd(h_s @ w_s.T, h_t @ w_t.T, beta), want, tol, f"JSD beta={beta}")
    total = chunked_divergence(h_s, w_s, h_t, w_t, divergence("jsd", beta, 1.0), chunk_size=8)
    u = unit_roundoff(torch.float32)
    assert_within(total, want.sum(), tol.sum() + LAM * math.sqrt(len(want)) * u * want.abs().sum(), "chunked JSD")
    # TRL's end points: beta 0 is forward KL(p_t || p_s), beta 1 reverse KL(p_s || p_t)
    zs, zt = h_s @ w_s.T, h_t @ w_t.T
    assert torch.equal(algo.generalized_jsd(zs, zt, 0.0), algo.forward_kl(zs, zt))
    assert_within(algo.generalized_jsd(zs, zt, 1.0), (ps * (ls - lt)).sum(1),
                  _row_tol(torch.maximum(E_s, E_t), (ps * (ls - lt).abs()).sum(1), (ls, lt), V), "reverse KL")


# ---------------------------------------------------------------- the stage on tiny models


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher (64 wide, 2 layers, given 10 SFT epochs (40 steps) on the arithmetic task so its next-token distributions are
    peaked: a fixed target far from the random student) and a random student (32 wide, 1 layer), one tokenizer."""
    from rich.console import Console

    from grpo.config import SFTConfig, stage_runner

    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine (as the one_thread fixture)
    root = tmp_path_factory.mktemp("distill")
    base = tiny_checkpoint(root / "base", hidden=64, layers=2, seed=1)
    sft = SFTConfig(epochs=10, batch_size=16, learning_rate=3e-3, max_length=96,  # 40 steps, each row 10 times
                    data={"source": "synthetic:arith", "num_examples": 64})
    teacher = stage_runner("sft")(sft, str(base), root / "teacher", Console(quiet=True))
    student = tiny_checkpoint(root / "student", hidden=32, layers=1, seed=2)
    return teacher, student, root


def _cfg(teacher, student, **kw):
    from grpo.config import DistillConfig

    base = {"teacher": str(teacher), "model": str(student), "steps": 3, "batch_size": 4, "max_length": 96,
            "learning_rate": 3e-3, "data": {"source": "synthetic:arith", "num_examples": 16}, "chunk_size": 64}
    return DistillConfig(**{**base, **kw})


def _loads(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 0
    return model


def test_kd_from_cli_writes_a_checkpoint(pair, tmp_path):
    """`r1 distill cfg.yaml` (forward KL), then a JSD run through train() into a student built from `init` on the
    teacher's vocabulary; both checkpoints load in transformers."""
    teacher, student, _ = pair
    cfg = {"mode": "kd", "teacher": str(teacher), "model": str(student), "steps": 4, "batch_size": 4,
           "max_length": 96, "learning_rate": 3e-3, "data": {"source": "synthetic:arith", "num_examples": 16}}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "kd"
    from grpo.cli import main  # `r1 distill` in-process (a subprocess would spend most of the test importing)

    assert main(["distill", str(tmp_path / "kd.yaml"), "--output", str(out)]) == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all(m["loss"] > 0 and m["tokens"] > 0 for m in lines)
    _loads(out / "final")
    from grpo.distill import train

    init = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256}
    final = train(_cfg(teacher, None, init=init, loss="jsd", jsd_beta=0.3), None, tmp_path / "jsd")  # a fresh student
    lines = [json.loads(l) for l in (tmp_path / "jsd" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(0 < m["loss"] < math.log(2) for m in lines)  # a generalised JSD is below log 2
    _loads(final)


def test_sft_mode_runs_sft_on_traces(pair, tmp_path):
    """mode sft: SFT through the registry on a traces file (prompt, completion rows)."""
    teacher, student, _ = pair
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": f"<think>{i}+{i}</think> "
                                          f"<answer>{2 * i}</answer>"}) + "\n" for i in range(12)))
    from grpo.distill import train

    cfg = _cfg(None, student, mode="sft", data={"source": str(traces), "completion_column": "completion"})
    final = train(cfg, str(student), tmp_path / "sft")
    lines = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(m["loss"]) for m in lines)
    before = _loads(student).state_dict()
    after = _loads(final).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


@pytest.mark.parametrize("form", ["advantage", "jsd"])
def test_on_policy_reverse_kl_falls(pair, tmp_path, form, one_thread):
    """The student samples, the teacher scores: the sampled per-token reverse KL on each step's fresh samples
    falls over a few dozen steps (both forms)."""
    teacher, student, _ = pair
    from grpo.distill import train

    steps = 30
    cfg = _cfg(teacher, student, mode="on_policy", on_policy_loss=form, steps=steps, prompts_per_step=4,
               group_size=4, learning_rate=1e-2, sampling={"max_tokens": 16})
    final = train(cfg, str(student), tmp_path / form)
    kl = [json.loads(l)["reverse_kl"] for l in (tmp_path / form / "metrics.jsonl").read_text().splitlines()]
    start, end = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    print(f"on_policy {form}: reverse KL {start:.3f} (first 5 steps) -> {end:.3f} (last 5 of {steps})")
    assert len(kl) == steps and end < 0.5 * start, kl
    _loads(final)


def test_vocabulary_mismatch_is_one_line(pair, tmp_path, capsys):
    """A student whose tokenizer differs: r1 exits 2 with one line naming both vocabularies."""
    teacher, _, _ = pair
    from grpo.cli import main
    from grpo.data.tokenizer import train_bpe
    from grpo.models import hf

    tok = train_bpe([f"the number {i} plus {i * 7} is {i * 8}" for i in range(300)], 400)
    other = tmp_path / "other"
    init = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256}
    hf.build_from_config(init, len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(other)
    tok.save_pretrained(other)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"mode": "kd", "teacher": str(teacher), "model": str(other), "steps": 1}))
    capsys.readouterr()  # drop save_pretrained's progress output
    assert main(["distill", str(cfg), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    n_teacher = len(hf.load_tokenizer(str(teacher)).get_vocab())
    assert str(teacher) in err and str(other) in err and f"teacher {n_teacher} tokens, student {len(tok)}" in err, err
    assert "first differing id" in err and not (tmp_path / "out" / "final").exists()


def test_config_errors_are_one_line(tmp_path, capsys):
    """A teacher path that is not a checkpoint, and kd without a teacher: one line each, before any model loads."""
    from grpo.cli import main

    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"mode": "kd", "teacher": str(tmp_path / "nowhere"), "steps": 1}))
    assert main(["distill", str(cfg), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"r1: error: distill.teacher: {tmp_path / 'nowhere'} is not a checkpoint directory (no config.json)"
    cfg.write_text(yaml.safe_dump({"mode": "on_policy", "steps": 1}))
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs `teacher`" in err, err
