"""SFT at scale: packed rows give the unpacked loss with less padding (HF Llama and r1kit's DeepSeek model),
epochs visit every example once, save_every + resume is bit-exact, held-out loss every N steps, chat templates.
All with tiny models on one CPU thread: about 25 s for the file (75 s on a loaded machine)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_checkpoint

from grpo import sft
from grpo.config import ConfigError, SFTConfig, load_stage
from grpo.data.synthetic import arithmetic_rows
from grpo.models import PRESETS, DeepseekForCausalLM, hf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls on a shared 2-core machine
CHAT = (r"{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
        r"{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["solution"]} for r in arithmetic_rows("train", n, seed)]


def run_cfg(**kw) -> SFTConfig:
    return SFTConfig.model_validate({"data": {"num_examples": 24}, "batch_size": 4, "learning_rate": 1e-3,
                                     "max_length": 256, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def deepseek_model(vocab: int) -> DeepseekForCausalLM:
    torch.manual_seed(0)
    return DeepseekForCausalLM(PRESETS["tiny"](vocab_size=vocab, num_hidden_layers=2)).train()  # MTP depth 1


@pytest.mark.parametrize("arch", ["llama", "deepseek"])
@pytest.mark.parametrize("loss_on", ["completion", "all"])
def test_packed_loss_equals_unpacked_with_less_padding(ckpt, arch, loss_on):
    """Same 12 examples, padded one per row vs packed several per row: the same loss (mean over all labelled
    tokens; for DeepSeek main + MTP) and gradients, fewer padded tokens. 1e-5 on a loss of ~6-8 is ~20 fp32 ulps:
    the two differ only in summation order (exp of masked scores is exactly 0), seen 0 to 2 ulps."""
    model, tok = hf.load(str(ckpt))
    model = model.train() if arch == "llama" else deepseek_model(len(tok))
    pairs = sft.encode_rows(rows(12), tok, "r1_zero", 256)
    cfg = SFTConfig(max_length=128, loss_on=loss_on)
    padded = sft.make_batch(pairs, tok.pad_token_id, cfg)
    packed = sft.make_batch(pairs, tok.pad_token_id, cfg.model_copy(update={"packing": True}))
    assert packed["input_ids"].shape[0] < len(pairs) and packed["input_ids"].shape[1] <= 128
    assert "attention_mask" not in packed and packed["tokens"] == padded["tokens"]
    out = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = sft.lm_loss(model, batch)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    gdiff = max((g0[k] - g1[k]).abs().max().item() for k in g0)
    print(f"{arch} loss_on={loss_on}: unpacked loss {l0:.7f}, packed {l1:.7f}, |diff| {abs(l0 - l1):.1e} "
          f"(bound 1e-5); padded tokens unpacked {padded['padded_tokens']} vs packed {packed['padded_tokens']}; "
          f"max |grad diff| {gdiff:.1e}")
    assert abs(l0 - l1) <= 1e-5 and gdiff < 1e-5 and g0.keys() == g1.keys()
    assert packed["padded_tokens"] < padded["padded_tokens"]
    # the held-out loss (main head only) agrees too
    e0, e1 = sft.nll_sum(model, padded), sft.nll_sum(model, packed)
    assert e0[1] == e1[1] and abs(e0[0] / e0[1] - e1[0] / e1[1]) <= 1e-5


def test_packing_keeps_documents_apart():
    """Packed rows: positions restart per example, the first token of each is never a target, rows fit
    max_length, and r1kit's DeepSeek model sees each example exactly as alone (no attention across them)."""
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(1, 200, (p,), generator=g).tolist(), torch.randint(1, 200, (c,), generator=g).tolist())
             for p, c in ((3, 5), (6, 2), (2, 9), (4, 4), (1, 7))]
    batch = sft.collate_packed(pairs, 0, "all", 20)
    assert batch["input_ids"].shape[1] <= 20 and int((batch["input_ids"] != 0).sum()) == sum(len(p) + len(c) for p, c in pairs)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == -100).all() and int(starts.sum()) >= len(pairs)
    model = deepseek_model(256).eval()
    with torch.no_grad():
        h = model.hidden(batch["input_ids"], None, batch["position_ids"])  # [R, L, D]
        for r in range(h.shape[0]):
            pos = batch["position_ids"][r]
            for s in torch.nonzero(pos == 0).flatten().tolist():
                n = int(pos[s:].diff().ne(1).nonzero().flatten()[0]) + 1 if (pos[s:].diff() != 1).any() else len(pos) - s
                ids = batch["input_ids"][r, s: s + n][None]
                alone = model.hidden(ids, None, torch.arange(n)[None])
                assert torch.allclose(h[r, s: s + n], alone[0], atol=1e-5), (r, s, n)


def test_epochs_visit_every_example_once_per_epoch(ckpt, tmp_path, monkeypatch):
    """epochs=3 over 10 examples in batches of 4: 8 steps, each epoch one pass in its own shuffled order."""
    n, bs, epochs = 10, 4, 3
    stream = [i for s in range(8) for i in sft.batch_indices(s, n, bs, 0, epochs * n)]
    assert sft.batch_indices(8, n, bs, 0, epochs * n) == []
    per_epoch = [stream[e * n:(e + 1) * n] for e in range(epochs)]
    assert all(sorted(p) == list(range(n)) for p in per_epoch) and len({tuple(p) for p in per_epoch}) == epochs
    seen = []
    real = sft.make_batch
    monkeypatch.setattr(sft, "make_batch", lambda pairs, *a: seen.append(pairs) or real(pairs, *a))
    out = tmp_path / "run"
    sft.train(run_cfg(data={"num_examples": n}, epochs=epochs, batch_size=bs, packing=True), str(ckpt), out)
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 9)) and m[-1]["epoch"] == epochs
    assert [r["examples"] for r in m] == [4] * 7 + [2]
    visits = [tuple(map(tuple, pair)) for step in seen for pair in step]
    for e in range(epochs):
        assert len(set(visits[e * n:(e + 1) * n])) == n  # all distinct encoded examples, once each
    assert set(visits[:n]) == set(visits[n: 2 * n]) == set(visits[2 * n:])


@pytest.mark.parametrize("arch", ["llama", "deepseek"])
def test_resume_is_bit_exact(ckpt, tmp_path, arch):
    """2 steps with save_every=1, then the same out_dir run to 4 steps, equals a straight 4-step run bit for bit
    (weights, and the metrics of every step). DeepSeek adds the router bias buffer and MTP to the state."""
    base = {"packing": True, "warmup_steps": 3, "eval_fraction": 0.2, "eval_every": 2}
    if arch == "deepseek":
        base |= {"init": {"preset": "tiny", "num_hidden_layers": 2, "hidden_size": 64}, "train_tokenizer": {"vocab_size": 300},
                 "data": {"num_examples": 12}}
    model = None if arch == "deepseek" else str(ckpt)
    straight = sft.train(run_cfg(steps=4, **base), model, tmp_path / "straight")
    sft.train(run_cfg(steps=2, save_every=1, **base), model, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "last" / "trainer_state").is_dir()
    resumed = sft.train(run_cfg(steps=4, save_every=1, **base), model, tmp_path / "resumed")
    a, _ = hf.load(str(straight))
    b, _ = hf.load(str(resumed))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if arch == "deepseek":
        assert any("e_score_correction_bias" in k and sa[k].abs().sum() > 0 for k in sa)  # the bias did move
    ma, mb = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    assert [(r["loss"], r.get("eval_loss")) for r in ma] == [(r["loss"], r.get("eval_loss")) for r in mb]


@pytest.mark.parametrize("held_out", [{"eval_fraction": 0.25},
                                      {"eval_data": {"source": "synthetic:arith", "split": "test", "num_examples": 6}}])
def test_eval_loss_every_n_steps(ckpt, tmp_path, held_out):
    """eval_every=2 over 5 steps: eval_loss at steps 2, 4 and the last; held-out rows are not trained on."""
    out = tmp_path / "run"
    cfg = run_cfg(steps=5, eval_every=2, **held_out)
    sft.train(cfg, str(ckpt), out)
    m = metrics(out)
    assert [r["step"] for r in m if "eval_loss" in r] == [2, 4, 5]
    assert all(0 < r["eval_loss"] < 20 for r in m if "eval_loss" in r)
    train_rows, held = sft.split_eval(rows(24), cfg)
    assert held and {r["prompt"] for r in train_rows}.isdisjoint({r["prompt"] for r in held})
    if "eval_fraction" in held_out:
        assert len(held) == 6 and len(train_rows) == 18


def test_chat_template(ckpt, tmp_path):
    """template: chat renders prompts with the tokenizer's chat template; the target is the assistant turn as the
    template closes it (EOS inside it, not added twice); prompt tokens are unlabelled; training runs."""
    model, tok = hf.load(str(ckpt))
    tok.chat_template = CHAT
    chat_ckpt = tmp_path / "chat"
    model.save_pretrained(chat_ckpt)
    tok.save_pretrained(chat_ckpt)
    model, tok = hf.load(str(chat_ckpt))
    assert tok.chat_template == CHAT
    pairs = sft.encode_rows([{"prompt": "1+2?", "completion": "3"}], tok, "chat", 64)
    (p, c), = pairs
    assert tok.decode(p) == "<|user|>\n1+2?\n<|assistant|>\n" and tok.decode(c) == "3<|endoftext|>\n"
    assert c.count(tok.eos_token_id) == 1
    batch = sft.collate(pairs, tok.pad_token_id, "completion")
    assert (batch["labels"][0, : len(p)] == -100).all() and batch["labels"][0, len(p):].tolist() == c
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"]}) + "\n"
                            for r in rows(8)))
    out = tmp_path / "run"
    sft.train(run_cfg(template="chat", steps=2, packing=True, data={"source": str(data), "completion_column": "completion"}),
              str(chat_ckpt), out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(out)) and (out / "final" / "config.json").is_file()
    with pytest.raises(ConfigError, match="template: 'chat' needs a tokenizer with a chat_template"):
        sft.train(run_cfg(template="chat", steps=1), str(ckpt), tmp_path / "no_template")


def test_config_errors(tmp_path):
    """Length, held-out and eval keys that contradict each other are one-line config errors."""
    for bad, says in (({"steps": 3, "epochs": 1}, "set `steps` or `epochs`, not both"),
                      ({"eval_fraction": 0.1, "eval_data": {}}, "not both"),
                      ({"eval_every": 5}, "`eval_every` needs `eval_data` or `eval_fraction`")):
        f = tmp_path / "stage.yaml"
        f.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=says):
            load_stage("sft", str(f))
    assert SFTConfig().steps == 100 and SFTConfig(epochs=2).steps is None
