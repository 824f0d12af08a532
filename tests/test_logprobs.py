"""grpo/logprobs.py: log-probs from hidden states through fused_logprob equal the full-logits path (values and
parameter gradients, fp32) for transformers Qwen2/Llama and r1kit's DeepSeek model; heads that are not a plain
linear map keep the logits path; the SFT loss equals the model's own `labels` loss."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import grpo.models.deepseek as deepseek
from grpo import algo, sft
from grpo.logprobs import TokenLogprobs, fusable
from grpo.models import PRESETS, DeepseekForCausalLM
from grpo.rollout import Completion
from grpo.logprobs import build_batch, policy_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
V = 320  # vocab of the tiny models


def hf_model(model_type: str, **kw):
    """A tiny randomly initialised transformers causal LM (std 0.08: sharp distributions, sensitive comparisons)."""
    fields = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, initializer_range=0.08, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=torch.float32)


def deepseek_model(**kw):
    """r1kit's tiny DeepSeek preset (MoE + MLA), std 0.08."""
    torch.manual_seed(0)
    return DeepseekForCausalLM(PRESETS["tiny"](vocab_size=V, initializer_range=0.08, **kw))


MODELS = {
    "qwen2": lambda: hf_model("qwen2"),
    "llama-tied": lambda: hf_model("llama", tie_word_embeddings=True),
    "deepseek": lambda: deepseek_model(num_nextn_predict_layers=1),
}


def grpo_batch():
    """Left-padded prompts of 3 lengths + right-padded completions of ragged lengths, as GRPO builds them."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 2)]
    comps = [Completion(i % 3, torch.randint(0, V, (n,), generator=g).tolist(), "", [], "stop")
             for i, n in enumerate((7, 1, 12, 4, 9, 3))]
    return build_batch(prompts, comps, pad_id=0)


def logits_path(lm, batch, temperature):
    """The pre-fused GRPO code: full [b, Lc, V] logits, then algo.token_logprobs."""
    Lp = batch["prompt_len"]
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"]).logits[:, Lp - 1: -1]
    return algo.token_logprobs(logits, batch["completion_ids"], temperature)


def value_and_grads(fn, lm, weights):
    """(logp, entropy, {param: grad of sum(weights * logp)})."""
    lm.zero_grad()
    logp, ent = fn()
    (logp * weights).sum().backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_logits_path(name):
    lm = MODELS[name]().train()
    scorer = TokenLogprobs(lm)
    assert scorer.fused
    batch = grpo_batch()
    weights = torch.randn(batch["completion_ids"].shape, generator=torch.Generator().manual_seed(2))
    weights /= weights.numel()  # a per-token mean, as the GRPO loss is: gradients of order 1
    lp0, ent0, g0 = value_and_grads(lambda: logits_path(lm, batch, 0.7), lm, weights)
    lp1, ent1, g1 = value_and_grads(lambda: policy_logprobs(scorer, batch, slice(None), 0.7), lm, weights)
    assert not ent1.requires_grad and lp1.dtype == torch.float32
    grad_diff = max((g0[k] - g1[k]).abs().max().item() for k in g0)
    print(f"{name}: max |logp diff| {(lp0 - lp1).abs().max():.1e}, max |entropy diff| {(ent0 - ent1).abs().max():.1e}, "
          f"max |param grad diff| {grad_diff:.1e} (largest grad {max(g.abs().max().item() for g in g0.values()):.1e})")
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(ent0, ent1, atol=1e-5)
    assert g0.keys() == g1.keys()  # the same parameters get gradients (the head's weight included)
    assert grad_diff < 1e-5


def test_heads_that_are_not_plain_linear_keep_the_logits_path():
    """Gemma-2's tanh softcap and a biased head: hidden @ W.T is not the logits, so the scorer runs the model."""
    gemma = hf_model("gemma2", head_dim=32, final_logit_softcapping=5.0)
    biased = hf_model("qwen2")
    biased.lm_head = torch.nn.Linear(64, V, bias=True)
    batch = grpo_batch()
    for lm in (gemma, biased):
        scorer = TokenLogprobs(lm)
        assert not fusable(lm) and not scorer.fused
        with torch.no_grad():
            lp, ent = policy_logprobs(scorer, batch, slice(None), 0.7)
            lp0, ent0 = logits_path(lm, batch, 0.7)
        assert torch.equal(lp, lp0) and torch.equal(ent, ent0)
    assert not fusable(hf_model("cohere", head_dim=32))  # logit_scale


def sft_batch():
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randint(0, V, (p,), generator=g).tolist(), torch.randint(0, V, (c,), generator=g).tolist())
             for p, c in ((4, 9), (7, 3), (2, 14))]
    return sft.collate(pairs, pad_id=0, loss_on="completion")


def test_sft_loss_equals_the_models_labels_loss():
    """transformers model: the fused loss equals model(labels=...).loss, value and gradients."""
    lm = MODELS["qwen2"]().train()
    batch = sft_batch()
    grads = []
    for loss_fn in (lambda: lm(**batch).loss, lambda: sft.lm_loss(lm, batch)):
        lm.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    diff = max((g0[k] - g1[k]).abs().max().item() for k in g0)
    print(f"sft qwen2: loss {l0.item():.6f} vs {l1.item():.6f}, max |param grad diff| {diff:.1e}")
    assert torch.allclose(l0, l1, atol=1e-5) and diff < 1e-5


def test_deepseek_fused_loss_equals_logits_loss(monkeypatch):
    """r1kit's DeepSeek loss (main + lambda * MTP + balance loss) with causal_lm_loss fused equals the same loss
    with causal_lm_loss as the plain cross-entropy over full logits: value and gradients."""
    lm = deepseek_model(num_nextn_predict_layers=1, aux_loss_alpha=0.01).train()
    batch = sft_batch()

    def logits_ce(h, weight, labels):  # the pre-fused causal_lm_loss
        return torch.nn.functional.cross_entropy((h @ weight.T)[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    grads = []
    for loss_fn in (logits_ce, deepseek.causal_lm_loss):  # the fused one last: it stays for the SFT check below
        monkeypatch.setattr(deepseek, "causal_lm_loss", loss_fn)
        lm.zero_grad()
        out = lm(**batch)
        out.loss.backward()
        assert out.mtp_loss is not None and out.aux_loss is not None
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    diff = max((g0[k] - g1[k]).abs().max().item() for k in g0)
    print(f"sft deepseek: loss {l0.item():.6f} vs {l1.item():.6f}, max |param grad diff| {diff:.1e}")
    assert g0.keys() == g1.keys() and torch.allclose(l0, l1, atol=1e-5) and diff < 1e-5
    assert sft.lm_loss(lm, batch).item() == pytest.approx(l1.item(), abs=1e-5)  # SFT runs the model's own loss
    no_logits = lm(**batch, return_logits=False)  # what SFT asks for: the same loss, no [B, S, V] tensor
    assert no_logits.logits is None and no_logits.loss.item() == pytest.approx(l1.item(), abs=1e-5)
