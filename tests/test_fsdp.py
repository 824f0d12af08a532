"""FSDP2 against DDP and one process: a real 2-process gloo torchrun (tests/fsdp_script.py) runs SFT and GRPO under
DDP and under FSDP2, resumes FSDP2 SFT and GRPO runs, and counts FSDP2's per-rank parameters; this test compares the
checkpoints. Tolerance: fp32 weights, and the only difference between the runs is the order in which the
gradient is summed (DDP's all-reduce of 2 rank gradients, FSDP2's reduce-scatter, one process summing all tokens in
one backward): ~1e-7 relative per step. Adam divides by sqrt(v), so where a gradient entry is tiny its rounding
passes on to the update: in one GRPO run a single down_proj weight differed by 4.6e-7 (6e-6 of the tensor's max)
while the tensor's norm-relative difference was ~3e-7. The checks use each tensor's norm-relative difference
||a - b|| / ||b|| < 1e-5 (30x the seen value; a wrong loss normalisation gives ~1e-3 and more).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from grpo import distill, reject, sft
from grpo.config import RuntimeConfig
from tests.fsdp_script import (distill_config, eval_config, eval_samples, on_policy_config, reject_config,
                               sft_config)
from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # see the module docstring


def weights(d: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of an HF checkpoint directory."""
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def max_rel(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||b|| (the same keys in both)."""
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def max_abs(a: dict, b: dict) -> float:
    """max over every element of |a - b| (printed beside max_rel)."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def moe_checkpoint(path: Path, tokenizer_from: Path) -> Path:
    """r1kit's tiny DeepSeek MoE model (2 layers, 16 experts, MTP depth 1) on `tokenizer_from`'s tokenizer, with a
    bias update speed of 0.01 so that a few steps move the router biases visibly."""
    from grpo.models import PRESETS, DeepseekForCausalLM, hf

    tok = hf.load_tokenizer(str(tokenizer_from))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(PRESETS["tiny"](vocab_size=len(tok), num_hidden_layers=2, bias_update_speed=0.01))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def reference_held(run: Path, what: str = "KL reference") -> tuple[int, int]:
    """(elements of the frozen model rank 0 holds, elements in all) from the stage's first line in `run`."""
    text = (run / "console.txt").read_text()
    found = re.search(what + r" sharded too: rank 0 holds (\d+) of (\d+) elements", text)
    assert found, text[-2000:]
    return int(found[1]), int(found[2])


def test_fsdp2_matches_ddp_and_one_process(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    student = tiny_checkpoint(tmp_path / "student", hidden=32, seed=2)  # distill's, with the base as its teacher
    moe = moe_checkpoint(tmp_path / "moe", base)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/fsdp_script.py",
                        str(base), str(out), str(student), str(moe)], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    start = weights(base)

    # each rank holds about half of the parameters (the tied embedding/head counted once)
    c = json.loads((out / "counts.json").read_text())
    print(f"FSDP2 per-rank parameter elements: {c['local']} of {c['total']}")
    assert c["world"] == 2 and len(c["local"]) == 2 and sum(c["local"]) == c["total"]
    assert all(abs(n - c["total"] / 2) <= 0.03 * c["total"] / 2 for n in c["local"])

    # SFT: DDP == FSDP2 == one process on the same global batch (8 examples: 4 per rank, or 8 in one)
    one = sft.train(sft_config("auto"), str(base), tmp_path / "sft_one")
    # fsdp2 in one process is a no-op: the same run, bit for bit
    one_fsdp2 = weights(sft.train(sft_config("fsdp2"), str(base), tmp_path / "sft_one_fsdp2"))
    assert all(torch.equal(v, weights(one)[k]) for k, v in one_fsdp2.items())
    sft_w = {k: weights(d) for k, d in [("ddp", out / "sft_ddp" / "final"), ("fsdp2", out / "sft_fsdp2" / "final"),
                                         ("one", one)]}
    moved = max_rel(sft_w["one"], start)
    diffs = {"fsdp2 vs ddp": max_rel(sft_w["fsdp2"], sft_w["ddp"]), "fsdp2 vs one": max_rel(sft_w["fsdp2"], sft_w["one"]),
             "ddp vs one": max_rel(sft_w["ddp"], sft_w["one"])}
    print(f"SFT max rel diff {diffs}; max abs diff fsdp2 vs ddp {max_abs(sft_w['fsdp2'], sft_w['ddp']):.3g}, "
          f"fsdp2 vs one {max_abs(sft_w['fsdp2'], sft_w['one']):.3g}; weights moved by {moved:.3g} (rel)")
    assert moved > 1000 * RTOL  # the runs trained: a difference below RTOL is not a no-op's
    assert all(d < RTOL for d in diffs.values()), diffs
    logs = {k: [json.loads(l) for l in (out / f"sft_{k}" / "metrics.jsonl").read_text().splitlines()]
            for k in ("ddp", "fsdp2")}
    one_log = [json.loads(l) for l in (tmp_path / "sft_one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_processes"] for r in logs["fsdp2"]] == [2] * 4
    # the global-token-mean loss and the DTensor grad norm equal the DDP and one-process ones
    for a, b in [(logs["fsdp2"], logs["ddp"]), (logs["fsdp2"], one_log)]:
        for ra, rb in zip(a, b, strict=True):
            assert abs(ra["loss"] - rb["loss"]) <= RTOL * rb["loss"]
            assert abs(ra["grad_norm"] - rb["grad_norm"]) <= RTOL * rb["grad_norm"]
            assert ra["tokens"] == rb["tokens"]
            assert ("eval_loss" in ra) == ("eval_loss" in rb) and abs(ra.get("eval_loss", 0) - rb.get("eval_loss", 0)) \
                <= RTOL * rb.get("eval_loss", 1)
    assert [r["step"] for r in logs["fsdp2"] if "eval_loss" in r] == [2, 4]

    # FSDP2 resume from the step-2 checkpoint (per-rank optimizer shards) continues bit-exactly
    assert sorted(f.name for f in (out / "sft_fsdp2" / "last" / "trainer_state").iterdir()) == \
        ["rank0.pt", "rank1.pt", "state.pt"]
    resumed = weights(out / "sft_resumed" / "final")
    assert all(torch.equal(resumed[k], sft_w["fsdp2"][k]) for k in resumed)
    tail = [json.loads(l) for l in (out / "sft_resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in tail] == \
        [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in logs["fsdp2"][2:]]

    # GRPO: 2-rank FSDP2 == 2-rank DDP (same seeds; sampling seeds depend on the rank), through a reference reset
    g = {k: weights(out / f"grpo_{k}" / "final") for k in ("ddp", "fsdp2")}
    g_moved = max_rel(g["ddp"], start)
    g_diff = max_rel(g["fsdp2"], g["ddp"])
    print(f"GRPO max rel diff fsdp2 vs ddp {g_diff:.3g}, max abs diff {max_abs(g['fsdp2'], g['ddp']):.3g}; "
          f"weights moved by {g_moved:.3g} (rel)")
    assert g_moved > 1000 * RTOL and g_diff < RTOL
    gl = {k: [json.loads(l) for l in (out / f"grpo_{k}" / "metrics.jsonl").read_text().splitlines()]
          for k in ("ddp", "fsdp2")}
    for ra, rb in zip(gl["fsdp2"], gl["ddp"], strict=True):
        assert ra["num_processes"] == 2 and ra["completions/mean_length"] == rb["completions/mean_length"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= RTOL * rb["grad_norm"]
    assert (out / "grpo_fsdp2" / "last" / "trainer_state" / "rank1.pt").is_file()
    # the sampler gathers the whole policy on every rank; each update's forward must find it sharded again
    for r in (0, 1):
        seen = json.loads((out / "grpo_fsdp2" / f"sharded_at_update_rank{r}.json").read_text())
        assert len(seen) >= 3 and all(seen), seen
    g_resumed = weights(out / "grpo_resumed" / "final")  # resumed at step 2: bit-exact
    assert all(torch.equal(v, g["fsdp2"][k]) for k, v in g_resumed.items())
    g_tail = [json.loads(l) for l in (out / "grpo_resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in g_tail] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in gl["fsdp2"][2:]]
    # the consolidated checkpoint is a plain HF directory with one copy of the tied embedding/head
    assert sorted(g["fsdp2"]) == sorted(start)
    # the KL reference is sharded too (the trainer counts rank 0's elements of it), and it is what the
    # DDP-equal, bit-exact-resumed runs above used, through its reset at step 2 and the saved reference
    held, total = reference_held(out / "grpo_fsdp2")
    print(f"GRPO reference under FSDP2: rank 0 holds {held} of {total} elements")
    assert total == c["total"] and abs(held - total / 2) <= 0.03 * total / 2

    # distill kd: 2-rank DDP == 2-rank FSDP2 == one process on the same global batch (8 rows: 4 per rank), with
    # the teacher sharded under FSDP2
    d_one = distill.train(distill_config(str(base), str(student), "auto"), str(student), tmp_path / "distill_one")
    d = {"one": weights(d_one), **{k: weights(out / f"distill_{k}" / "final") for k in ("ddp", "fsdp2")}}
    d_moved = max_rel(d["one"], weights(student))
    d_diffs = {"fsdp2 vs ddp": max_rel(d["fsdp2"], d["ddp"]), "fsdp2 vs one": max_rel(d["fsdp2"], d["one"]),
               "ddp vs one": max_rel(d["ddp"], d["one"])}
    held, total = reference_held(out / "distill_fsdp2", "teacher")
    assert "[distill] FSDP2 over 2 processes" in (out / "distill_fsdp2" / "console.txt").read_text()
    print(f"distill kd max rel diff {d_diffs}; weights moved by {d_moved:.3g} (rel); teacher under FSDP2: rank 0 "
          f"holds {held} of {total} elements")
    assert d_moved > 1000 * RTOL and all(v < RTOL for v in d_diffs.values()), d_diffs
    assert total == c["total"] and abs(held - total / 2) <= 0.03 * total / 2
    d_logs = {k: [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
              for k, root in (("one", tmp_path / "distill_one"), ("fsdp2", out / "distill_fsdp2"))}
    for a, b in zip(d_logs["fsdp2"], d_logs["one"], strict=True):  # the global mean, over every rank's positions
        assert a["num_processes"] == 2 and a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= RTOL * b["loss"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= RTOL * b["grad_norm"]  # Adam hides a mis-scaled gradient

    # distill on_policy, both losses: 2-rank DDP == FSDP2 == one process (each rank samples its 2 of the 4 prompts
    # with one process's seeds, so the samples are the same; the loss is the global token mean)
    for loss in ("advantage", "jsd"):
        one = distill.train(on_policy_config(str(base), str(student), "auto", loss), str(student),
                            tmp_path / f"on_policy_{loss}_one")
        o = {"one": weights(one), **{k: weights(out / f"on_policy_{loss}_{k}" / "final") for k in ("ddp", "fsdp2")}}
        o_diffs = {f"{k} vs one": max_rel(o[k], o["one"]) for k in ("ddp", "fsdp2")}
        o_moved = max_rel(o["one"], weights(student))
        logs = {k: [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
                for k, root in (("one", tmp_path / f"on_policy_{loss}_one"), ("fsdp2", out / f"on_policy_{loss}_fsdp2"))}
        print(f"distill on_policy {loss}: max rel diff {o_diffs}; weights moved by {o_moved:.3g} (rel)")
        assert o_moved > 1000 * RTOL and all(v < RTOL for v in o_diffs.values()), o_diffs
        for a, b in zip(logs["fsdp2"], logs["one"], strict=True):
            assert a["num_processes"] == 2 and a["tokens"] == b["tokens"]
            assert a["completions/mean_length"] == b["completions/mean_length"]
            assert abs(a["loss"] - b["loss"]) <= RTOL * abs(b["loss"]) + 1e-7
            assert abs(a["reverse_kl"] - b["reverse_kl"]) <= 1e-5 * (1 + abs(b["reverse_kl"]))

    # DeepSeek MoE under DDP == one process, router biases included: the bias update counts the real (unpadded)
    # tokens of the global batch (each rank pads its own share differently; the loads are summed over ranks)
    # (FSDP2 too: its checkpoint is r1kit's own save_pretrained of the gathered weights, MTP file included)
    m_one = weights(sft.train(sft_config("auto"), str(moe), tmp_path / "sft_moe_one"))
    m_start = weights(moe)
    bias = [k for k in m_one if k.endswith("e_score_correction_bias")]
    plain = lambda w: {k: v for k, v in w.items() if k not in bias}  # noqa: E731
    assert len(bias) == 2 and all(not torch.equal(m_one[k], m_start[k]) for k in bias)
    assert max_rel(plain(m_one), plain(m_start)) > 1000 * RTOL
    assert (out / "sft_moe_fsdp2" / "final" / "mtp.safetensors").is_file()
    for kind in ("ddp", "fsdp2"):
        m = weights(out / f"sft_moe_{kind}" / "final")
        m_diff = max_rel(plain(m), plain(m_one))
        print(f"DeepSeek MoE SFT, {kind} vs one process: weights max rel diff {m_diff:.3g}; router biases moved by up "
              f"to {max(float(m_one[k].abs().max()) for k in bias):.3g}, equal: {all(torch.equal(m[k], m_one[k]) for k in bias)}")
        assert all(torch.equal(m[k], m_one[k]) for k in bias)  # sums of gamma * sign(mean - load): exact
        assert m_diff < RTOL

    # LoRA GRPO: FSDP2 == DDP, merged weights and adapter (its checkpoint written from an unsharded copy on rank 0),
    # and the resumed FSDP2 LoRA run ends bit-exact; the weight stream a sharded LoRA model sends vLLM is the whole one
    lora = {k: (weights(out / f"grpo_lora_{k}" / "final"), weights(out / f"grpo_lora_{k}" / "final" / "adapter"))
            for k in ("ddp", "fsdp2", "resumed")}
    l_diff = max(max_rel(lora["fsdp2"][i], lora["ddp"][i]) for i in (0, 1))
    b_norm = min(float(v.norm()) for k, v in lora["ddp"][1].items() if "lora_B" in k)
    print(f"LoRA GRPO fsdp2 vs ddp: max rel diff {l_diff:.3g} (merged weights and adapter); smallest trained "
          f"lora_B norm {b_norm:.3g}")
    assert l_diff < RTOL and b_norm > 0
    assert all(torch.equal(v, lora["fsdp2"][i][k]) for i in (0, 1) for k, v in lora["resumed"][i].items())
    push = json.loads((out / "lora_push.json").read_text())
    print(f"LoRA vLLM stream under FSDP2: {push['n']} tensors, max |sharded - whole| {push['max_abs']:.2g}, "
          f"merged delta up to {push['delta']:.2g}")
    assert push["sharded"] and push["same_names"] and push["delta"] > 1e-3 and push["max_abs"] <= 1e-6

    # reject: two ranks sharing the shards write the very bytes one process writes
    one_reject = tmp_path / "reject_one"
    reject.run(reject_config(str(base)), str(base), one_reject)
    files = ("data/train.jsonl", "data/train.parquet", "stats.json")
    stats = json.loads((one_reject / "stats.json").read_text())
    print(f"reject over 2 ranks: kept {stats['kept']} of {stats['samples']}, the same bytes as one process")
    assert 0 < stats["kept"] < stats["samples"] == 32
    assert all((out / "reject" / f).read_bytes() == (one_reject / f).read_bytes() for f in files)
    shard_dirs = sorted((out / "reject" / "shards").glob("shard-*"))
    sampled_by = [json.loads((d / "stats.json").read_text())["rank"] for d in shard_dirs]
    assert sampled_by == [0, 1, 0, 1]  # round robin: each rank sampled half the shards

    # eval: two ranks, each sampling its share of the problems (seeded as in one process), write one process's bytes
    from grpo import evaluate

    one_eval = evaluate.run(eval_config(), str(base), tmp_path / "eval_one")
    two = json.loads((out / "eval" / "eval" / "result.json").read_text())
    print(f"eval over 2 ranks == one process: {two == json.loads(one_eval.read_text())}; "
          f"arith mean_length {two['arith']['mean_length']:.2f}, pass@1 {two['arith']['pass@1']:.3f}")
    assert (out / "eval" / "eval" / "result.json").read_bytes() == one_eval.read_bytes()
    split = [tuple(x) for x in json.loads((out / "eval_samples.json").read_text())]  # the samples themselves
    whole = [(i, list(t)) for i, t in eval_samples(str(base), 0, 1)]
    assert split == whole and len({tuple(t) for _, t in whole}) == len(whole) == 15
    assert (out / "eval" / "eval" / "result.md").read_bytes() == (tmp_path / "eval_one" / "eval" / "result.md").read_bytes()


def test_distributed_config_errors():
    """runtime.distributed takes auto | ddp | fsdp2 | deepspeed; fsdp2 with compile is refused, naming the field."""
    with pytest.raises(ValidationError, match="distributed"):
        RuntimeConfig(distributed="zero3")
    with pytest.raises(ValidationError, match="runtime.compile: not supported with distributed: fsdp2"):
        RuntimeConfig(distributed="fsdp2", compile=True)
    assert RuntimeConfig().distributed == "auto"


def test_a_stuck_peer_fails_the_collective_within_its_timeout():
    """runtime.collective_timeout_s bounds every collective: with rank 1 stalled, rank 0's all-reduce raises after
    about 3 s instead of waiting (a real stall of a real gloo peer, not a mock)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        str(REPO / "tests" / "timeout_script.py")], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "all_reduce returned" not in out, out[-2000:]
    waited = float(out.split("collective failed after ")[1].split(" s")[0])
    print(f"rank 0's all-reduce with a stalled peer failed after {waited:.1f} s (timeout 3 s)")
    assert 2.5 <= waited <= 30, out[-2000:]
