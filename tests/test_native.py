"""Native sampler: grouping, stops, seeds, and behaviour log-probs equal to what the trainer recomputes."""

import pytest
import torch

from grpo.logprobs import TokenLogprobs
from grpo.models import hf
from grpo.rollout import SamplingParams
from grpo.rollout.native import NativeWorker, sample_next
from grpo.templates import render
from grpo.logprobs import build_batch, policy_logprobs
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    model, tok = hf.load(str(path))
    prompts = [render("r1_zero", p) for p in ["Compute 2 + 3", "Compute 4 * 5 - 6", "Compute 1"]]
    return model, tok, tok(prompts, add_special_tokens=False).input_ids


def test_groups_lengths_and_reasons(tiny):
    model, tok, ids = tiny
    comps = NativeWorker(model, tok).generate(ids, 4, SamplingParams(max_tokens=10, seed=0))
    assert [c.prompt_index for c in comps] == [0] * 4 + [1] * 4 + [2] * 4
    for c in comps:
        assert len(c.token_ids) == len(c.logprobs) <= 10
        assert c.finish_reason == ("length" if len(c.token_ids) == 10 and tok.eos_token_id not in c.token_ids else "stop")
        assert all(lp <= 0 for lp in c.logprobs)


def test_seed_reproducible_and_different_seeds_differ(tiny):
    model, tok, ids = tiny
    w = NativeWorker(model, tok)
    a = w.generate(ids, 3, SamplingParams(max_tokens=12, seed=7))
    b = w.generate(ids, 3, SamplingParams(max_tokens=12, seed=7))
    c = w.generate(ids, 3, SamplingParams(max_tokens=12, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_behaviour_logprobs_match_trainer(tiny):
    model, tok, ids = tiny
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, seed=1)
    comps = NativeWorker(model, tok, max_batch_size=5).generate(ids, 4, sp)  # chunking across prompts too
    batch = build_batch(ids, comps, tok.pad_token_id)
    with torch.no_grad():
        lp, _ = policy_logprobs(TokenLogprobs(model), batch, slice(0, len(comps)), sp.temperature)
    for i, c in enumerate(comps):
        assert torch.allclose(lp[i, : len(c.logprobs)], torch.tensor(c.logprobs), atol=1e-4), i


def test_stop_string_cuts_text_and_is_kept(tiny):
    model, tok, ids = tiny
    # stop on any digit or space-like piece that appears early: take the first generated text's 2nd char
    w = NativeWorker(model, tok)
    free = w.generate(ids[:1], 1, SamplingParams(max_tokens=20, seed=3))[0]
    stop = free.text[3:5]
    assert len(stop) == 2
    cut = w.generate(ids[:1], 1, SamplingParams(max_tokens=20, seed=3, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text.endswith(stop) and stop not in cut.text[:-len(stop)]
    assert free.text.startswith(cut.text) and len(cut.token_ids) <= len(free.token_ids)


def test_top_k_one_is_greedy_and_top_p_masks_tail():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for seed in range(5):
        tok, lp = sample_next(logits, SamplingParams(top_k=1), torch.Generator().manual_seed(seed))
        assert tok.item() == 1
        assert lp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())
    # probs ~ [0.09, 0.67, 0.24, 0.01]: top_p 0.7 keeps tokens 1 and 2 only
    seen = {sample_next(logits, SamplingParams(top_p=0.7), torch.Generator().manual_seed(s))[0].item() for s in range(200)}
    assert seen == {1, 2}
