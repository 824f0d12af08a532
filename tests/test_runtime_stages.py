"""The `runtime` section every stage shares (grpo/accel.py): device placement, bf16 autocast, gradient
checkpointing and LoRA through peft, each checked for real on CPU on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_checkpoint
from tolerance import measured_floor, unit_roundoff
from transformers import AutoModelForCausalLM

from grpo import accel, distill, sft, trainer
from grpo.config import ConfigError, DistillConfig, GRPOConfig, RuntimeConfig, SFTConfig
from grpo.data.synthetic import arithmetic_rows
from grpo.logprobs import TokenLogprobs
from grpo.models import hf
from grpo.sft import encode_rows, lm_loss, make_batch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("base"), tie=False)


def _grpo(**kw) -> GRPOConfig:
    cfg = dict(data={"source": "synthetic:arith", "num_examples": 32}, group_size=4, prompts_per_step=2, steps=2,
               sampling={"max_tokens": 10, "stop": ["</answer>"]}, learning_rate=1e-2, beta=0.1, micro_batch_size=8,
               rewards=[{"name": "tests.helpers:length_reward"}])
    cfg.update(kw)
    return GRPOConfig.model_validate(cfg)


def _batch(tok, n=4, seed=0):
    rows = [{"prompt": r["prompt"], "completion": r["solution"]} for r in arithmetic_rows("train", n, seed=seed)]
    cfg = SFTConfig(batch_size=n)
    return make_batch(encode_rows(rows, tok, "r1_zero", 128, "test"), tok.pad_token_id, cfg)


def _logp(model, batch) -> torch.Tensor:
    """Per-token log-probs [B, L-1] of the batch's own next tokens (targets < 0 -> 0)."""
    ids = batch["input_ids"]
    targets = torch.where(batch["labels"][:, 1:] >= 0, ids[:, 1:], -1)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return TokenLogprobs(model)(ids, batch["attention_mask"], pos, targets, 1, 1.0)[0]


# ---------------------------------------------------------------- LoRA


def test_lora_grpo_trains_one_copy_and_its_reference_is_the_base(base, tmp_path, monkeypatch):
    """A LoRA GRPO run: while it trains, the process holds one Llama (the policy; its reference is the adapter
    disabled), where a full run holds two; the reference log-probs are the base model's (KL is exactly 0 at
    step 1, when the adapter is still zero); only the adapter moved; the checkpoint loads in peft and, merged, in
    transformers with the same log-probs."""
    import gc

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    counts = []

    def reward(completions, **_):  # runs inside the loop: count the Llama models alive at that moment
        gc.collect()
        counts.append(sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()))
        return [-abs(20 - len(c)) / 20 for c in completions]

    monkeypatch.setattr("tests.helpers.length_reward", reward)
    trainer.train(_grpo(), str(base), tmp_path / "full")
    full_counts, counts[:] = list(counts), []
    lora = {"r": 4, "alpha": 8}
    final = trainer.train(_grpo(runtime={"lora": lora}), str(base), tmp_path / "lora")
    print(f"\nLlama models alive during GRPO: full {full_counts}, LoRA {counts}")
    assert set(full_counts) == {2} and set(counts) == {1}
    rows = [json.loads(l) for l in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # step 1: policy == base exactly; then the adapter moved

    start = AutoModelForCausalLM.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(final)
    for (name, a), b in zip(start.named_parameters(), merged.parameters()):
        linear = name.endswith("proj.weight")  # all-linear: attention and MLP projections; not embeddings/head
        assert linear or torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), merged.parameters()))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(final / "adapter"))
    _, tok = hf.load(str(base))
    batch = _batch(tok)
    with torch.no_grad():
        lp_adapter, lp_merged = _logp(adapted, batch), _logp(merged, batch)
        with accel.adapter_disabled(adapted):
            lp_ref = _logp(adapted, batch)
        lp_base = _logp(start, batch)
    assert torch.equal(lp_ref, lp_base)  # the LoRA reference is the base model, bit for bit
    # merged W + s*B@A against the adapter's separate path: a few fp32 roundings per weight and dot product
    assert (lp_adapter - lp_merged).abs().max() < 1e-4
    assert (lp_adapter - lp_base).abs().max() > 1e-3


def test_lora_on_the_deepseek_model_adapts_attention_and_experts(tmp_path):
    """LoRA SFT on r1kit's MoE/MLA model: adapters on the MLA projections, the MLPs and every routed expert
    (peft target_parameters); the merged checkpoint loads in transformers with changed expert weights."""
    cfg = SFTConfig.model_validate({
        "init": {"preset": "tiny", "num_hidden_layers": 2}, "train_tokenizer": {"vocab_size": 400},
        "data": {"num_examples": 64}, "steps": 3, "batch_size": 8, "learning_rate": 1e-2,
        "runtime": {"lora": {"r": 2, "alpha": 4}}})
    pre = SFTConfig.model_validate({**cfg.model_dump(), "runtime": {}, "steps": 1})
    base = sft.train(pre, None, tmp_path / "base")
    final = sft.train(cfg.model_copy(update={"init": None, "train_tokenizer": None}), str(base), tmp_path / "lora")
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert "experts.gate_up_proj" in adapter["target_parameters"] and "kv_b_proj" in adapter["target_modules"]
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(final).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".mlp.experts." in k for k in changed) and any("kv_b_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)


# ---------------------------------------------------------------- gradient checkpointing, bf16


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn() -> loss; also the bytes autograd saved for backward outside checkpointed regions."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return loss, total[0]


@pytest.mark.parametrize("kind", ["llama", "deepseek"])
def test_gradient_checkpointing_same_loss_and_gradients_less_saved_memory(base, tmp_path, kind):
    """Recomputation repeats the same operations in the same order, so loss and gradients are identical bit for
    bit; the activations kept for backward shrink (printed)."""
    if kind == "llama":
        model, tok = hf.load(str(base))
    else:
        from grpo.models import PRESETS, DeepseekForCausalLM

        _, tok = hf.load(str(base))
        torch.manual_seed(0)
        model = DeepseekForCausalLM(PRESETS["tiny"](vocab_size=len(tok), num_hidden_layers=3, aux_loss_alpha=0.0))
    batch = _batch(tok, n=8)
    results = {}
    for ckpt in (False, True):
        m = accel.prepare_trainable(__import__("copy").deepcopy(model), RuntimeConfig(gradient_checkpointing=ckpt))
        m.train()
        loss, saved = _saved_bytes(lambda: lm_loss(m, batch))
        loss.backward()
        results[ckpt] = (loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None], saved)
    (l0, g0, s0), (l1, g1, s1) = results[False], results[True]
    print(f"\n{kind}: activations saved for backward {s0 / 2**20:.2f} MiB -> {s1 / 2**20:.2f} MiB with "
          f"gradient checkpointing ({s1 / s0:.0%})")
    assert torch.equal(l0, l1) and len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert s1 < 0.6 * s0


def test_bf16_autocast_loss_matches_fp32_within_bf16_rounding(base):
    """The SFT loss under runtime.mixed_precision: bf16 against fp32 on small shapes (CPUs without bf16 units
    emulate it). Bound: the model's own fp32 rounding error, measured against float64, scaled from fp32's unit
    roundoff to bf16's, times 2 x 4 (both sides, and the spread between summation orders, as parity_tol)."""
    model, tok = hf.load(str(base))
    batch = _batch(tok)
    with torch.no_grad():
        l32 = lm_loss(model, batch)
        l64 = lm_loss(__import__("copy").deepcopy(model).double(), batch)
        with accel.autocast(RuntimeConfig(mixed_precision="bf16")):
            l16 = lm_loss(model, batch)
    floor = max(measured_floor(l32, l64), unit_roundoff(torch.float32) * l64.abs().item())
    tol = 2 * 4 * floor * unit_roundoff(torch.bfloat16) / unit_roundoff(torch.float32)
    print(f"\nloss fp32 {l32.item():.6f}, bf16 autocast {l16.item():.6f}, |diff| {abs(l16 - l32).item():.2e}, "
          f"bound {tol:.2e}")
    assert abs(l16.item() - l32.item()) <= tol
    assert l16.item() != l32.item()  # autocast did run the matmuls in bf16


def test_bf16_autocast_gradients_through_the_fused_head_match_fp32_and_every_stage_trains(base, tmp_path):
    """mixed_precision: bf16 (the GPU recipes' setting) in backward: the gradients of the policy log-probs (through
    fused_logprob, whose backward runs inside GRPO's autocast region) against fp32, bounded as the loss test is, by
    fp32's own error against float64 scaled to bf16's unit roundoff, 2 sides x 4, in norm; then one step of SFT,
    GRPO and distill under it, whose weights stay fp32."""
    import copy

    model, tok = hf.load(str(base))
    batch = _batch(tok)

    def grads(m, bf16=False):
        m = copy.deepcopy(m)
        with accel.autocast(RuntimeConfig(mixed_precision="bf16" if bf16 else "no")):
            lp = _logp(m, batch)
            (lp.sum() / lp.numel()).backward()  # inside the region, as trainer.backward_batch calls it
        return torch.cat([p.grad.flatten().double() for p in m.parameters()])

    g32, g64, g16 = grads(model), grads(model.double()), grads(model.float(), bf16=True)
    err = lambda g: ((g - g64).norm() / g64.norm()).item()  # noqa: E731
    floor = max(err(g32), unit_roundoff(torch.float32))
    tol = 2 * 4 * floor * unit_roundoff(torch.bfloat16) / unit_roundoff(torch.float32)
    print(f"\ngradient rel error vs float64: fp32 {err(g32):.2e}, bf16 autocast {err(g16):.2e}, bound {tol:.2e}")
    assert 0 < err(g16) <= tol and not torch.equal(g16, g32.double())

    rt = {"mixed_precision": "bf16"}
    final = sft.train(SFTConfig.model_validate({"data": {"num_examples": 16}, "steps": 1, "batch_size": 4,
                                                "runtime": rt}), str(base), tmp_path / "sft")
    trainer.train(_grpo(steps=1, runtime=rt), str(base), tmp_path / "grpo")
    distill.train(DistillConfig.model_validate({"mode": "on_policy", "teacher": str(base), "steps": 1, "runtime": rt,
                                                "data": {"num_examples": 8}, "prompts_per_step": 2,
                                                "group_size": 2, "sampling": {"max_tokens": 8}}),
                  str(base), tmp_path / "distill")
    for stage in ("sft", "grpo", "distill"):
        row = json.loads((tmp_path / stage / "metrics.jsonl").read_text().splitlines()[-1])
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), (stage, row)
    trained = AutoModelForCausalLM.from_pretrained(final)
    assert all(p.dtype == torch.float32 for p in trained.parameters())


@pytest.mark.parametrize("S,T,masked,Hkv,causal", [(20, 20, False, 4, True), (20, 20, True, 2, True),
                                                   (1, 9, True, 2, True), (6, 300, False, 4, True),
                                                   (8, 12, False, 2, True), (8, 8, False, 4, False)])
def test_short_bf16_attention_matches_sdpa_within_bf16_rounding(S, T, masked, Hkv, causal):
    """r1kit_sdpa (what hf.load gives HF models): bf16 on CPU over <= SHORT_BF16_KEYS keys runs as bmm + fp32
    softmax. Its output and gradients against float64 are within what torch's own bf16 sdpa shows, x 4 (summation
    order), causal (upper-left past the queries, as transformers' sdpa), padded or bidirectional, grouped-query or
    not; longer ones and fp32 stay sdpa exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from grpo.models.hf import sdpa_or_bmm

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 4 // Hkv, causal

    torch.manual_seed(0)
    B, H, D = 3, 4, 16
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    mask = None
    if masked:  # left padding on row 0, causal over the last S of T positions
        mask = torch.ones(S, T, dtype=torch.bool).tril(T - S)[None, None].repeat(B, 1, 1, 1)
        mask[0, ..., :3] = False
    m = Attn()

    def run(fn, dtype, *ts):
        ts = [t.to(dtype).requires_grad_() for t in ts]
        out = fn(m, *ts, mask)[0]
        out.float().pow(2).sum().backward()
        return [out.double()] + [t.grad.double() for t in ts]

    want = run(sdpa_attention_forward, torch.float64, q, k, v)
    ours, torch_bf16 = run(sdpa_or_bmm, torch.bfloat16, q, k, v), run(sdpa_attention_forward, torch.bfloat16, q, k, v)
    for name, a, b, w in zip(["out", "dq", "dk", "dv"], ours, torch_bf16, want):
        err, floor = (a - w).abs().max().item(), (b - w).abs().max().item()
        assert err <= 4 * floor, (name, err, floor)
    assert torch.equal(run(sdpa_or_bmm, torch.float32, q, k, v)[0], run(sdpa_attention_forward, torch.float32, q, k, v)[0])
    assert hf.load.__module__ and hf.SHORT_BF16_KEYS == 256


@pytest.mark.parametrize("units", ["0", "1"])
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16_units(base, monkeypatch, units):
    """mixed_precision / reference_dtype / sampler_dtype `auto`: bf16 where the CPU has bf16 units
    (grpo.runtime.cpu_has_fast_bf16, forced both ways by R1KIT_CPU_BF16), else fp32; hf.load gives HF models
    r1kit_sdpa."""
    monkeypatch.setenv("R1KIT_CPU_BF16", units)
    native = units == "1"
    rt = RuntimeConfig(mixed_precision="auto", reference_dtype="auto", sampler_dtype="auto")
    assert accel.native_bf16(torch.device("cpu")) == native
    with accel.autocast(rt):
        assert torch.is_autocast_enabled("cpu") == native
    assert accel.frozen_dtype(rt) == (torch.bfloat16 if native else torch.float32)
    assert accel.sampler_dtype(rt) == (torch.bfloat16 if native else None)
    assert accel.sampler_dtype(RuntimeConfig(sampler_dtype="bfloat16")) == torch.bfloat16
    assert accel.sampler_dtype(RuntimeConfig()) is None
    assert hf.load(str(base))[0].config._attn_implementation == "r1kit_sdpa"


def test_grpo_with_a_bf16_sampler_copy_keeps_it_in_step_with_the_policy(base, tmp_path, monkeypatch):
    """runtime.sampler_dtype bfloat16 in GRPO: the sampler/trainer log-prob gap (rollout/logprob_abs_diff) is bf16
    rounding at every step, because the copy takes each update; with the refresh turned off, step 2 samples from
    the step-1 weights and the gap grows."""
    from grpo.rollout.native import NativeWorker

    def gaps(name):
        trainer.train(_grpo(steps=2, learning_rate=3e-2, runtime={"sampler_dtype": "bfloat16"}), str(base),
                      tmp_path / name)
        return [json.loads(l)["rollout/logprob_abs_diff"] for l in (tmp_path / name / "metrics.jsonl").open()]

    synced = gaps("synced")
    monkeypatch.setattr(NativeWorker, "update_weights", lambda self, *a: None)
    stale = gaps("stale")
    print(f"\nbf16 sampler gap per step: refreshed {synced}, never refreshed {stale}")
    assert 0 < synced[0] == stale[0] and synced[1] < 0.5 * stale[1]


def test_bf16_reference_grpo_runs_and_its_kl_is_finite(base, tmp_path):
    """GRPO with the frozen reference in bf16 while the policy trains in fp32 (reference_dtype)."""
    trainer.train(_grpo(steps=1, runtime={"reference_dtype": "bfloat16"}), str(base), tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # step 1: policy fp32 vs its bf16-rounded copy: a KL of bf16 rounding size, not zero
    assert math.isfinite(row["kl"]) and 0 < row["kl"] < 1e-2


def test_compiled_layers_match_eager_within_fp32_rounding_and_a_compiled_grpo_step_runs(base, tmp_path):
    """runtime.compile on the HF Llama and on r1kit's DeepSeek MoE (its expert kernel runs eagerly between two
    compiled graphs): loss and gradients of the compiled layers (inductor fuses and reorders the reductions)
    against eager fp32, bounded as parity_tol does by eager's own error against float64, 2 sides x 4; then a GRPO
    step with compiled policy and reference layers, whose native sampler decodes eagerly."""
    import copy

    from grpo.models import PRESETS, DeepseekForCausalLM

    llama, tok = hf.load(str(base))
    torch.manual_seed(0)
    deepseek = DeepseekForCausalLM(PRESETS["tiny"](vocab_size=len(tok), num_hidden_layers=2, aux_loss_alpha=0.0))
    batch = _batch(tok)

    def loss_and_grads(m):
        loss = lm_loss(m, batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    for name, model in (("llama", llama), ("deepseek", deepseek)):
        torch._dynamo.utils.counters.clear()
        compiled = accel.compile_layers(copy.deepcopy(model), RuntimeConfig(compile=True))
        lc, gc = loss_and_grads(compiled)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        l32, g32 = loss_and_grads(copy.deepcopy(model))
        l64, g64 = loss_and_grads(copy.deepcopy(model).double())
        for what, c, e, e64 in (("loss", lc, l32, l64), ("gradients", gc, g32, g64)):
            tol = 2 * 4 * max(measured_floor(e, e64), unit_roundoff(torch.float32) * e64.abs().max().item())
            print(f"\n{name}: compiled ({graphs} graphs) vs eager {what}: max |diff| "
                  f"{(c - e).abs().max().item():.2e}, bound {tol:.2e}")
            assert (c - e).abs().max().item() <= tol
        assert 0 < graphs <= 6  # compiled, and the MoE kernel is one clean break, not a graph per data-dependent op
    trainer.train(_grpo(steps=1, runtime={"compile": True}), str(base), tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["loss"]) and abs(row["kl"]) < 1e-6  # step 1: the compiled reference is the policy
    with pytest.raises(ValueError, match="runtime.compile: not supported with distributed: fsdp2"):
        RuntimeConfig(compile=True, distributed="fsdp2")


# ---------------------------------------------------------------- device


def test_every_tensor_a_stage_hands_its_models_is_on_the_models_device(base, tmp_path):
    """A global forward pre-hook records, for every module call during SFT, GRPO and distill steps, whether each
    tensor argument sits on that module's own device."""
    seen, bad = [0], []

    def hook(module, args):  # global hooks see positional arguments; the stages pass ids etc. by keyword to
        # the top model, whose submodules then get them positionally, so every layer's inputs are covered
        own = next(module.parameters(recurse=False), None)
        if own is None:
            return
        for a in args:
            if isinstance(a, torch.Tensor):
                seen[0] += 1
                if a.device != own.device:
                    bad.append((type(module).__name__, a.device, own.device))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        sft.train(SFTConfig.model_validate({"data": {"num_examples": 16}, "steps": 1, "batch_size": 4}),
                  str(base), tmp_path / "sft")
        trainer.train(_grpo(steps=1), str(base), tmp_path / "grpo")
        distill.train(DistillConfig.model_validate({"mode": "on_policy", "teacher": str(base), "steps": 1,
                                                    "data": {"num_examples": 8}, "prompts_per_step": 2,
                                                    "group_size": 2, "sampling": {"max_tokens": 8}}),
                      str(base), tmp_path / "distill")
    finally:
        handle.remove()
    assert seen[0] > 100 and not bad, bad[:5]
    # each stage logs its compute: SFT 6 N per real token (N: the parameters a token multiplies by, all but the
    # untied input embedding, a lookup); GRPO and distill at least their update's 6 N per token
    lm = AutoModelForCausalLM.from_pretrained(base)
    n = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    row = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["compute/flops"] == 6 * n * row["tokens"] and row["compute/seconds"] > 0
    for stage in ("grpo", "distill"):
        row = json.loads((tmp_path / stage / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["compute/flops"] > 6 * n * row.get("tokens", 1) > 0
    assert accel.stage_device(RuntimeConfig()) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_runtime_errors_are_one_line():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="runtime.device: cuda:1, but torch sees no CUDA device"):
            accel.stage_device(RuntimeConfig(device="cuda:1"))
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        RuntimeConfig(device="gpu")
    with pytest.raises(ValueError, match="ref_reset_every with runtime.lora"):
        _grpo(ref_reset_every=10, runtime={"lora": {}})
    with pytest.raises(ValueError, match="runtime.sampler_dtype: bfloat16 is not supported with lora"):
        RuntimeConfig(sampler_dtype="bfloat16", lora={})
    with pytest.raises(ValueError, match="runtime.sampler_dtype: auto is not supported with distributed: fsdp2"):
        RuntimeConfig(sampler_dtype="auto", distributed="fsdp2")
    with pytest.raises(ValueError, match="runtime.sampler_dtype is the native sampler's"):
        _grpo(rollout="vllm", runtime={"sampler_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="vllm_sleep_level"):
        _grpo(vllm_sleep_level=3)
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size needs rollout: vllm"):
        _grpo(vllm_tensor_parallel_size=2)
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size > 1 with dynamic_sampling"):
        _grpo(rollout="vllm", vllm_tensor_parallel_size=2, dynamic_sampling={"max_batches": 2})


def test_lora_sft_resume_is_bit_exact(base, tmp_path):
    """A LoRA run saved at step 2 and continued to 4 (base reloaded from `model`, adapter from last/adapter)
    equals a straight 4-step run bit for bit, merged weights and losses."""
    cfg = lambda **kw: SFTConfig.model_validate({"data": {"num_examples": 32}, "batch_size": 4,  # noqa: E731
                                                 "learning_rate": 1e-2, "warmup_steps": 1,
                                                 "runtime": {"lora": {"r": 4, "alpha": 8}}, **kw})
    straight = sft.train(cfg(steps=4), str(base), tmp_path / "straight")
    sft.train(cfg(steps=2, save_every=1), str(base), tmp_path / "resumed")
    resumed = sft.train(cfg(steps=4, save_every=1), str(base), tmp_path / "resumed")
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "resumed")]
    assert len(losses[1]) == 4 and losses[0] == losses[1]
