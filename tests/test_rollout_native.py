"""Native engine: its sampler draws from softmax(logits / T) with top-p/top-k as configured (chi-square on a tiny
model's next-token distribution), per-request seeds make outputs independent of batching (buffered cache,
length buckets, compaction of finished rows), and it runs r1kit's own MLA model."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grpo.rollout.base import SamplingParams  # noqa: E402
from grpo.rollout.native import NativeWorker  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matmuls gain nothing from 2 threads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Qwen2 whose lm_head is scaled up so the next-token distribution is far from uniform."""
    from rollout_models import build_qwen2

    model, tok = build_qwen2(str(tmp_path_factory.mktemp("qwen2_native")), head_dim=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)
    return model, tok


def rescored(w, prompts, comps, temperature):
    """max |behaviour log-prob - teacher-forced log-prob| over all completions."""
    ref = w.score([prompts[c.prompt_index] + c.token_ids for c in comps], [len(prompts[c.prompt_index]) for c in comps],
                  temperature)
    return max(abs(a - b) for c, r in zip(comps, ref) for a, b in zip(c.logprobs, r))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are pooled. p from the chi2 survival
    function Q(k/2, x/2) (torch.special.gammaincc)."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2).item()


def next_token_probs(model, prompt, temperature, top_p=1.0, top_k=-1):
    """The distribution the sampler should draw the first token from: softmax(logits / T) restricted to top-k and
    the top-p nucleus, renormalised."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    p = torch.softmax(logits, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    order = torch.argsort(p, descending=True)
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        ps = p[order]
        drop = ps.cumsum(0) - ps > top_p
        keep[order[drop]] = False
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum(), torch.log_softmax(logits, -1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, -1), (1.3, 0.8, -1), (1.0, 1.0, 5)])
def test_chi_square_next_token_distribution(tiny, temperature, top_p, top_k):
    model, tok = tiny
    prompt = tok("<think> one plus two")["input_ids"]
    probs, logp = next_token_probs(model, prompt, temperature, top_p, top_k)
    N = 4000
    comps = NativeWorker(model, tok, max_batch_size=N).generate(
        [prompt], N, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=1, seed=11))
    first = torch.tensor([c.token_ids[0] for c in comps])
    counts = torch.bincount(first, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0  # nothing outside the top-p/top-k set
    p = chi2_pvalue(counts, probs)
    assert p > 1e-3, f"sampled counts do not fit softmax(logits/{temperature}) top_p={top_p} top_k={top_k}: p={p}"
    # power check: the same draws are rejected against the distribution at 1.5x the temperature
    assert chi2_pvalue(counts, next_token_probs(model, prompt, 1.5 * temperature, top_p, top_k)[0]) < 1e-6
    assert (probs > 0).sum() >= 3  # a real distribution, not a near-argmax
    # behaviour log-probs: untruncated log_softmax(logits / T) of the drawn token
    got = torch.tensor([c.logprobs[0] for c in comps[:50]], dtype=torch.float64)
    assert torch.allclose(got, logp[first[:50]], atol=1e-4)


def test_outputs_do_not_depend_on_batching(tiny):
    """Same seeds -> same samples whether all rows run in one batch or one prompt at a time; a frequent stop
    string makes many rows finish early, so compaction of the buffered cache runs on the way."""
    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ["<think> one plus two", "answer: 12 + 7 =", "so we get", "the cat"]]
    probe = NativeWorker(model, tok).generate(prompts, 4, SamplingParams(temperature=1.0, max_tokens=24, seed=3))
    chars = {ch for c in probe for ch in c.text if ch.isascii() and ch.isprintable() and ch != " "}
    stop = min(chars, key=lambda ch: abs(sum(ch in c.text for c in probe) - 8))  # in about half of the texts
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=3, stop=[stop])
    big = NativeWorker(model, tok, max_batch_size=64).generate(prompts, 4, sp)
    small = NativeWorker(model, tok, max_batch_size=4).generate(prompts, 4, sp)
    assert [c.prompt_index for c in big] == [i for i in range(4) for _ in range(4)]
    assert [c.token_ids for c in big] == [c.token_ids for c in small]
    assert max(abs(a - b) for x, y in zip(big, small) for a, b in zip(x.logprobs, y.logprobs)) < 1e-4
    stopped = [c for c in big if c.finish_reason == "stop"]
    assert 4 <= len(stopped) < 16 and all(stop in c.text for c in stopped)
    # behaviour log-probs equal the teacher-forced ones of the trainer's model (through the buffered cache)
    assert rescored(NativeWorker(model, tok), prompts, big, 1.0) < 1e-4
    other = NativeWorker(model, tok).generate(prompts, 4, SamplingParams(temperature=1.0, max_tokens=24, seed=4))
    assert [c.token_ids for c in other] != [c.token_ids for c in probe]


def test_draws_made_in_blocks_are_the_per_step_draws(tiny, monkeypatch):
    """The sampler makes its random draws DRAWS steps at a time: the table equals step-by-step draws bit for bit,
    so a generation whose length crosses several blocks samples exactly what one block would."""
    from grpo.rollout import native

    keys = torch.tensor([3, -7, 2**61, 0])
    table = native.uniform(keys, torch.arange(10, 20))  # [4, 10]
    assert all(torch.equal(table[:, j], native.uniform(keys, 10 + j)) for j in range(10))
    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ["<think> one plus two", "the cat"]]
    sp = SamplingParams(temperature=1.0, max_tokens=20, seed=11)
    one = NativeWorker(model, tok).generate(prompts, 3, sp)
    monkeypatch.setattr(native, "DRAWS", 3)
    blocks = NativeWorker(model, tok).generate(prompts, 3, sp)
    assert [c.token_ids for c in one] == [c.token_ids for c in blocks] and max(len(c.token_ids) for c in one) > 3


def test_greedy_and_errors(tiny):
    model, tok = tiny
    prompt = tok("answer: 12 + 7 =")["input_ids"]
    g = NativeWorker(model, tok).generate([prompt], 2, SamplingParams(temperature=0.0, max_tokens=16))
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    ref = hf[0, len(prompt):].tolist()
    assert g[0].token_ids == g[1].token_ids == ref[:len(g[0].token_ids)]
    with pytest.raises(ValueError, match="exceeds the context window max_model_len=1024"):
        NativeWorker(model, tok).generate([prompt * 200], 1, SamplingParams(max_tokens=4))
    left = NativeWorker(model, tok, truncate="left").generate([prompt * 200], 1,
                                                              SamplingParams(temperature=0.0, max_tokens=4))
    assert len(left[0].token_ids) == 4


def test_r1kit_mla_model(tmp_path):
    """r1kit's DeepSeek-V3-style model (MLA latent cache, MoE) samples through the same engine."""
    from grpo.models.configs import tiny as tiny_cfg
    from grpo.models.deepseek import DeepseekForCausalLM

    from rollout_models import build_tokenizer

    tok = build_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_cfg(vocab_size=len(tok), eos_token_id=tok.eos_token_id)).float().eval()
    prompts = [tok("<think> one plus two")["input_ids"], tok("answer:")["input_ids"]]
    w = NativeWorker(model, tok, max_batch_size=8)
    comps = w.generate(prompts, 3, SamplingParams(temperature=0.8, max_tokens=12, seed=0))
    assert [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1]
    assert rescored(w, prompts, comps, 0.8) < 1e-3


def test_grouped_query_model_decodes_through_buffered_cache(tmp_path):
    """The recipe's Llama (4 query heads on 2 KV heads): decoding steps use the repeat_kv-free attention, whose
    log-probs equal a plain sdpa forward; the model's attention setting is restored for training."""
    from rollout_models import build_llama

    model, tok = build_llama(str(tmp_path))
    prompts = [tok("<think> one plus two")["input_ids"], tok("answer: 12 + 7 =")["input_ids"]]
    w = NativeWorker(model, tok)
    comps = w.generate(prompts, 3, SamplingParams(temperature=0.9, max_tokens=20, seed=2))
    assert model.config._attn_implementation == "sdpa"
    assert rescored(w, prompts, comps, 0.9) < 1e-4


def test_eager_attention_model_decodes_through_the_4d_mask(tmp_path):
    """A model set to eager attention keeps it (no repeat_kv-free path) and takes the same ready 4D padding mask;
    its behaviour log-probs still equal a plain forward's, with prompts of different lengths (left padding)."""
    from rollout_models import build_llama

    model, tok = build_llama(str(tmp_path))
    model.config._attn_implementation = "eager"
    prompts = [tok("<think> one plus two")["input_ids"], tok("answer:")["input_ids"]]
    w = NativeWorker(model, tok)
    comps = w.generate(prompts, 3, SamplingParams(temperature=0.9, max_tokens=20, seed=2))
    assert model.config._attn_implementation == "eager"
    assert rescored(w, prompts, comps, 0.9) < 1e-4


def test_a_bf16_sampler_copy_samples_in_bf16_and_takes_each_update(tmp_path):
    """runtime.sampler_dtype bfloat16: the worker holds a bf16 copy (the trainer's fp32 model untouched), decodes
    through the bf16 buffered cache and the C attention's bf16 build, and its behaviour log-probs equal its own
    bf16 teacher-forced forward within bf16 rounding, the fp32 model's within bf16's error; update_weights casts
    a changed policy into the copy."""
    from rollout_models import build_llama
    from tolerance import unit_roundoff

    model, tok = build_llama(str(tmp_path))
    prompts = [tok("<think> one plus two")["input_ids"], tok("answer:")["input_ids"]]
    w = NativeWorker(model, tok, dtype=torch.bfloat16)
    assert w.model is not model and next(w.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    sp = SamplingParams(temperature=0.9, max_tokens=20, seed=2)
    comps = w.generate(prompts, 3, sp)
    # a log-prob is a logit minus a logsumexp: bf16 rounds each to u of the logits' size, on both sides (x 2), and
    # the decoding and teacher-forced passes sum in different orders (x 4, as parity_tol)
    with torch.no_grad():
        seqs = torch.tensor([prompts[0] + comps[0].token_ids])
        logit = model(seqs).logits.abs().max().item() / 0.9
    tol = 2 * 4 * unit_roundoff(torch.bfloat16) * (1 + logit)
    own, fp32 = rescored(w, prompts, comps, 0.9), rescored(NativeWorker(model, tok), prompts, comps, 0.9)
    print(f"\nbf16 sampler: |behaviour - own bf16 forward| {own:.2e}, |behaviour - fp32 forward| {fp32:.2e}, "
          f"bound {tol:.2e}")
    assert own < tol and 0 < fp32 < tol
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    assert not torch.equal(w.model.lm_head.weight, model.lm_head.weight.bfloat16())
    w.update_weights(model)
    assert all(torch.equal(a, b.bfloat16()) for a, b in zip(w.model.state_dict().values(),
                                                           model.state_dict().values()))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_plain_decoding_steps_equal_transformers_forward(tmp_path, arch, monkeypatch):
    """PlainDecoder (grpo/rollout/decode.py) replaces transformers' forward on one-token steps of Llama/Qwen2:
    Qwen2 with q/k/v biases, the recipe's Llama with 4 query heads on 2 KV heads. With the same seeds both
    paths draw the same tokens, with behaviour log-probs within fp32 rounding of each other and of a
    teacher-forced forward; and the plain path really ran (one call per decoding step)."""
    import rollout_models

    from grpo.rollout import decode

    model, tok = getattr(rollout_models, f"build_{arch}")(str(tmp_path))
    assert decode.PlainDecoder.supports(model)
    prompts = [tok("<think> one plus two")["input_ids"], tok("answer:")["input_ids"]]
    sp = SamplingParams(temperature=0.9, max_tokens=24, seed=5)
    calls = [0]
    step = decode.PlainDecoder.step

    def counted(self, *a):
        calls[0] += 1
        return step(self, *a)

    monkeypatch.setattr(decode.PlainDecoder, "step", counted)
    plain = NativeWorker(model, tok).generate(prompts, 3, sp)
    n, calls[0] = calls[0], 0
    forwards = [0]
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (forwards.__setitem__(0, forwards[0] + 1), forward(*a, **k))[1])
    hf = NativeWorker(model, tok, plain_decode=False).generate(prompts, 3, sp)
    assert calls[0] == 0 and n == forwards[0] - 1 > 0  # every forward but the prefill was a plain step
    assert [c.token_ids for c in plain] == [c.token_ids for c in hf]
    gap = max(abs(a - b) for p, h in zip(plain, hf) for a, b in zip(p.logprobs, h.logprobs))
    print(f"\n{arch}: plain vs transformers decoding, max |log-prob diff| {gap:.2e} over {n} plain steps")
    assert gap < 1e-4 and rescored(NativeWorker(model, tok), prompts, plain, 0.9) < 1e-4
