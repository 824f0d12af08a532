"""grpo/models/deepseek.py against transformers 5.19 (logits, checkpoints both ways, V2 and V3), its own two MLA
paths, the KV cache under left padding, aux-loss-free balancing, MTP loss and key names, gradient checkpointing.
Tiny configs in fp32; weights drawn at std 0.08 (not 0.02) so that attention is far from uniform and routing
decisions are sharp, which makes the comparisons sensitive."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from grpo.models import PRESETS, DeepseekConfig, DeepseekForCausalLM, MLACache
from tolerance import parity_tol

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def tiny_cfg(**kw) -> DeepseekConfig:
    """tiny preset, small vocab, YaRN on, group-limited routing (4 groups, 2 kept), top-4 of 16."""
    return PRESETS["tiny"](**{**dict(vocab_size=256, num_nextn_predict_layers=0, max_position_embeddings=2048,
                                     rope_parameters=dict(YARN)), **kw})


def randomize(model: DeepseekForCausalLM, std: float = 0.08, seed: int = 0) -> DeepseekForCausalLM:
    """Random weights at `std`, norms around 1, a non-zero router correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(moe.gate.e_score_correction_bias.shape, generator=g)
                                                   * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An r1kit model with MTP, saved once; (model, directory)."""
    model = randomize(DeepseekForCausalLM(tiny_cfg(num_nextn_predict_layers=1)))
    path = str(tmp_path_factory.mktemp("ck") / "model")
    model.save_pretrained(path)
    return model, path


def test_logits_match_transformers(saved):
    from transformers import AutoModelForCausalLM

    model, path = saved
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert (cfg["model_type"], cfg["topk_method"], cfg["scoring_func"]) == ("deepseek_v3", "noaux_tc", "sigmoid")
    hf.eval()
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding in row 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
        ours_pad = model(x, attention_mask=mask, position_ids=pos).logits
        theirs_pad = hf(x, attention_mask=mask, position_ids=pos).logits
    diff = (ours - theirs).abs().max().item()
    diff_pad = (ours_pad[mask.bool()] - theirs_pad[mask.bool()]).abs().max().item()
    tol = parity_tol(hf, lambda m: m(x).logits)  # from transformers' own fp32 error against its float64 copy
    tol_pad = parity_tol(hf, lambda m: m(x, attention_mask=mask, position_ids=pos).logits[mask.bool()])  # the same
    print(f"max |logits r1kit - transformers| = {diff:.2e} (bound {tol:.2e}), left-padded {diff_pad:.2e} "
          f"(bound {tol_pad:.2e})")
    assert diff <= tol and diff_pad <= tol_pad

    # the parity is not vacuous: the bias and the group limit both change the routing, hence the logits
    with torch.no_grad():
        saved_bias = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        no_bias = model(x).logits
        for m, b in zip(model.moe_layers(), saved_bias):
            m.gate.e_score_correction_bias.copy_(b)
        model.config.topk_group = 4
        no_group = model(x).logits
        model.config.topk_group = 2
    assert (no_bias - ours).abs().max() > 1e-2 and (no_group - ours).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:.*no MTP weights")
def test_loads_hf_per_expert_checkpoints(tmp_path):
    """transformers writes per-expert keys and an fp32 router bias even for a bf16 model; r1kit loads it."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = tiny_cfg(num_nextn_predict_layers=1)  # transformers keeps the setting but drops MTP weights on save
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",
                                                                                          "model_type")})
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_cfg)
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    hf.eval().save_pretrained(tmp_path / "fp32")
    keys = load_file(tmp_path / "fp32" / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in keys and not any("gate_up_proj" in k for k in keys)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = DeepseekForCausalLM.from_pretrained(str(tmp_path / "fp32")).eval()
    assert len(ours.mtp) == 1
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():  # bound: transformers' own fp32 error against its float64 copy (tests/tolerance.py)
        assert (ours(x).logits - hf(x).logits).abs().max() <= parity_tol(hf, lambda m: m(x).logits)

    # a real V3 checkpoint: bf16 weights, fp32 e_score_correction_bias
    (tmp_path / "bf16").mkdir()
    os.link(tmp_path / "fp32" / "config.json", tmp_path / "bf16" / "config.json")
    sd = {k: v if "correction_bias" in k else v.to(torch.bfloat16)
          for k, v in load_file(tmp_path / "fp32" / "model.safetensors").items()}
    save_file(sd, tmp_path / "bf16" / "model.safetensors")
    bias = sd["model.layers.1.mlp.gate.e_score_correction_bias"]
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours16 = DeepseekForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(ours16.model.layers[1].mlp.gate.e_score_correction_bias, bias)

    for drop in ("model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"):
        save_file({k: v for k, v in sd.items() if k != drop}, tmp_path / "bf16" / "model.safetensors")
        with pytest.raises(ValueError, match=drop.replace(".", r"\.")):
            DeepseekForCausalLM.from_pretrained(str(tmp_path / "bf16"))


def test_loads_hf_deepseek_v2_checkpoint(tmp_path):
    """V2 style: softmax router, group-limited greedy (group max), no q compression, no correction bias."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hf_cfg = DeepseekV2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=16,
        num_experts_per_tok=4, routed_scaling_factor=1.5, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
        v_head_dim=32, qk_nope_head_dim=32, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        first_k_dense_replace=1, norm_topk_prob=False, initializer_range=0.08,
        rope_parameters=dict(YARN))
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = DeepseekForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert (ours.config.scoring_func, ours.config.topk_method) == ("softmax", "group_limited_greedy")
    assert ours.model.layers[1].mlp.gate.e_score_correction_bias is None
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    tol = parity_tol(hf, lambda m: m(x).logits)  # transformers' own fp32 error against its float64 copy
    print(f"V2 max |logits r1kit - transformers| = {diff:.2e} (bound {tol:.2e})")
    assert diff <= tol


def test_absorbed_decode_matches_expanded_and_full_forward():
    """64 decode steps on a left-padded batch: the absorbed path (attention in latent space, cache = latent +
    rope key) equals the expanded path, and both equal one full-sequence forward; rows can be dropped."""
    model = randomize(DeepseekForCausalLM(tiny_cfg()))
    B, P, steps = 3, 8, 64
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 256, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :3] = 0
    runs = {}
    for mode in ("expanded", "absorbed"):
        model.set_mla_mode(mode)
        ids, am = prompt, mask
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(ids, attention_mask=am, position_ids=pos, use_cache=True)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
            for _ in range(steps):
                nxt = logits[-1].argmax(-1, keepdim=True)  # greedy, same tokens for both modes (checked below)
                ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], 1)
                out = model(nxt, attention_mask=am, position_ids=pos[:, -1:] + 1, past_key_values=cache,
                            use_cache=True)
                pos = torch.cat([pos, pos[:, -1:] + 1], 1)
                logits.append(out.logits[:, -1])
        runs[mode] = (torch.stack(logits, 1), ids, am, pos, cache)
    (le, ids_e, am, pos, cache), (la, ids_a, _, _, cache_a) = runs["expanded"], runs["absorbed"]
    assert torch.equal(ids_e, ids_a)
    # all three are the same maths in other orders: bound from the full forward's fp32 error against float64
    model.set_mla_mode("auto")
    tol = parity_tol(model, lambda m: m(ids_e, attention_mask=am, position_ids=pos).logits[:, P - 1:])
    diff = (le - la).abs().max().item()
    print(f"absorbed vs expanded, {steps} decode steps: max |dlogits| = {diff:.2e} (bound {tol:.2e})")
    assert diff <= tol
    cfg = model.config
    assert cache_a.get_seq_length() == P + steps
    assert cache_a.bytes_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    with torch.no_grad():
        full = model(ids_e, attention_mask=am, position_ids=pos).logits[:, P - 1:]  # same positions as le
    assert (full - le).abs().max() <= tol
    # drop row 1 and continue: matches the same rows of the 3-row cache
    cache_a.batch_select_indices(torch.tensor([0, 2]))
    nxt = ids_a[[0, 2], -1:]
    with torch.no_grad():
        out = model(nxt, attention_mask=torch.cat([am[[0, 2]], torch.ones(2, 1, dtype=am.dtype)], 1),
                    position_ids=pos[[0, 2], -1:] + 1, past_key_values=cache_a, use_cache=True)
        ref = model(torch.cat([ids_a[[0, 2]], nxt], 1),
                    attention_mask=torch.cat([am[[0, 2]], torch.ones(2, 1, dtype=am.dtype)], 1),
                    position_ids=torch.cat([pos[[0, 2]], pos[[0, 2], -1:] + 1], 1)).logits[:, -1]
    assert cache_a.get_seq_length() == P + steps + 1
    assert (out.logits[:, -1] - ref).abs().max() <= tol


def test_bias_update_balances_expert_load():
    """On skewed input (a router that favours 2 of 8 experts), training with the aux-loss-free bias update drives
    max/mean expert load towards 1 over a few hundred steps; the same training without it stays skewed."""
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                         n_routed_experts=8, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
                         qk_nope_head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                         first_k_dense_replace=0, initializer_range=0.1, bias_update_speed=0.003)
    data = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(3))

    def train(gamma: float, steps: int = 300) -> list[float]:
        torch.manual_seed(0)
        model = DeepseekForCausalLM(cfg).train()
        with torch.no_grad():  # skew: every token shares a direction u that experts 0 and 1 score highly
            u = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(4))
            model.model.embed_tokens.weight += u / u.norm()
            model.model.layers[0].mlp.gate.weight[:2] += 3 * u / u.norm()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        history = []
        for _ in range(steps):
            loss = model(data, labels=data).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(model.update_expert_bias(gamma)["moe/load_max_over_mean"])
        return history

    with_bias, without = train(cfg.bias_update_speed), train(0.0)
    first, last_with, last_without = with_bias[0], sum(with_bias[-20:]) / 20, sum(without[-20:]) / 20
    print(f"expert load max/mean: start {first:.2f}; after 300 steps with bias update {last_with:.2f}, "
          f"without {last_without:.2f}")
    assert first > 2.5
    assert last_with < 1.4 and last_without > 2.0 and last_with < 0.6 * last_without


def test_mtp_loss_and_vllm_key_names(saved, tmp_path):
    """Loss = main + lambda * mean_k MTP_k; MTP parameters get gradients; the saved layer-N keys are the names
    vLLM's DeepSeekMTP loader rewrites onto its DeepSeekMultiTokenPredictorLayer; save/load round-trips."""
    from vllm.model_executor.models.deepseek_mtp import DeepSeekMTP
    from vllm.model_executor.models.utils import get_spec_layer_idx_from_weight_name

    model, path = saved
    cfg = model.config
    N = cfg.num_hidden_layers
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    model.train()
    out = model(x, labels=x)
    model.eval()
    assert model.mtp[0].block.mlp.load.sum() == x.shape[0] * (x.shape[1] - 1) * cfg.num_experts_per_tok
    model.update_expert_bias(0.0)  # reset the counters
    main = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert out.mtp_loss is not None and out.mtp_loss > 0
    assert torch.allclose(out.loss, main + cfg.mtp_loss_weight * out.mtp_loss, atol=1e-5)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0 and model.mtp[0].enorm.weight.grad.abs().sum() > 0
    model.zero_grad()

    mtp_keys = set(load_file(os.path.join(path, "mtp.safetensors")).keys())
    main_keys = set(load_file(os.path.join(path, "model.safetensors")).keys())
    assert not any(k.startswith(f"model.layers.{N}.") for k in main_keys)
    vllm_cfg = type("C", (), {"num_hidden_layers": N, "num_nextn_predict_layers": 1})()
    rewritten = set()
    for k in mtp_keys:
        assert get_spec_layer_idx_from_weight_name(vllm_cfg, k) == N, k
        rewritten.add(DeepSeekMTP._rewrite_spec_layer_name(None, N, k))
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight"):
        assert f"model.layers.{N}.{name}" in rewritten
    assert "model.embed_tokens.weight" in rewritten  # shared embedding goes top-level
    block = {k.split(f"model.layers.{N}.mtp_block.")[1] for k in rewritten if ".mtp_block." in k}
    layer = {k.split(f"model.layers.{N - 1}.")[1] for k in main_keys if k.startswith(f"model.layers.{N - 1}.")}
    assert block == layer  # the MTP block is a full MoE decoder layer under the same names
    again = DeepseekForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        a, b = model(x, labels=x), again(x, labels=x)
    assert torch.allclose(a.mtp_loss, b.mtp_loss) and torch.allclose(a.logits, b.logits)


def test_gradient_checkpointing_and_balance_loss():
    """Checkpointed layers give the same loss and gradients; the sequence-wise balance loss is positive, adds to
    the loss and reaches the router."""
    model = randomize(DeepseekForCausalLM(tiny_cfg(aux_loss_alpha=0.01, num_nextn_predict_layers=1))).train()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        grads.append((out.loss.detach(), out.aux_loss.detach(),
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, a0, g0), (l1, a1, g1) = grads
    assert a0 > 0 and torch.allclose(l0, l1, atol=1e-6) and torch.allclose(a0, a1)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    assert g0["model.layers.1.mlp.gate.weight"].abs().sum() > 0
    out = model(x)  # no labels (GRPO computes its own loss): the balance loss is still there to add
    assert out.loss is None and torch.allclose(out.aux_loss, a0)
    loads = model.expert_load_stats()
    assert loads["moe/load_max_over_mean"] >= 1.0


def test_save_is_atomic_and_keeps_side_files(saved, tmp_path):
    """Saving over an existing checkpoint replaces its weights and keeps files it does not own (tokenizer)."""
    model, _ = saved
    path = tmp_path / "ck"
    model.save_pretrained(str(path))
    (path / "tokenizer.json").write_text("{}")
    model.save_pretrained(str(path))
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "mtp.safetensors", "tokenizer.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_presets_build():
    """Preset shapes: tiny has a few million parameters; real configs are what the published JSON says."""
    tiny = DeepseekForCausalLM(PRESETS["tiny"]())
    n = sum(p.numel() for p in tiny.parameters())
    assert 1e6 < n < 1e7
    v3, lite = PRESETS["v3"](), PRESETS["v2_lite"]()
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.num_hidden_layers, v3.num_nextn_predict_layers) == \
        (256, 8, 61, 1)
    assert (lite.q_lora_rank, lite.n_routed_experts, lite.scoring_func) == (None, 64, "softmax")
    vl = PRESETS["tiny_vllm"]()
    assert vl.kv_lora_rank + vl.qk_rope_head_dim == 576
    assert isinstance(MLACache().get_seq_length(), int)


def test_native_sampler_on_r1kit_model():
    """grpo/rollout/native.py drives this model as it drives transformers': left-padded prompts, the group
    repeated with batch_select_indices, finished rows dropped, absorbed decode. Its behaviour log-probs equal a
    teacher-forced forward over the same tokens."""
    from grpo.data.tokenizer import train_bpe
    from grpo.rollout import SamplingParams
    from grpo.rollout.native import NativeWorker

    tok = train_bpe([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], 200)
    model = randomize(DeepseekForCausalLM(tiny_cfg(vocab_size=len(tok))))
    worker = NativeWorker(model, tok)
    prompts = [tok("12 + 7 =").input_ids, tok("3 + 4").input_ids, tok("1").input_ids]
    comps = worker.generate(prompts, 3, SamplingParams(max_tokens=24, seed=0))
    assert [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(c.token_ids) for c in comps}) > 3  # the group really samples different continuations
    seqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
    scored = worker.score(seqs, [len(prompts[c.prompt_index]) for c in comps])
    gap = max(abs(a - b) for c, s in zip(comps, scored) for a, b in zip(c.logprobs, s))
    print(f"native sampler behaviour vs teacher-forced log-prob: max gap {gap:.2e}")
    assert gap <= 1e-4
