"""Rejection sampling: the pure filters on hand-made completions, dedup/cap, decontamination, and the stage from
the CLI and a recipe on a tiny model (every sample accounted for; a SIGKILLed run resumes byte-identical)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from grpo import pipeline
from grpo.cli import main as cli_main
from grpo.config import ConfigError, DataConfig, RejectConfig, load_recipe
from grpo.data import DataError, load_rows
from grpo.reject import (contaminated, fails_keep, first_reasons, has_code_block, keep_rule, long_paragraph,
                         mixed_language, repetitive, select)
from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EVEN = "def even(completions, completion_ids=None, **kw):\n    return [float(len(i) % 2 == 0) for i in completion_ids]\n"


# ---------------------------------------------------------------- pure functions (well under a second)


def test_each_filter_drops_what_it_should():
    assert long_paragraph("short.\n\n" + "x" * 50, 40) and not long_paragraph("a" * 30 + "\n\n" + "b" * 30, 40)
    assert has_code_block("<think>try\n```python\nprint(1)\n```</think>") and not has_code_block("use `x` inline")
    assert repetitive(["the cat sat " * 10, "one two three four five six"], 3, 0.5) == [True, False]
    en = "<think> First add the two numbers, then multiply the sum by three. </think> <answer> 9 </answer>"
    mixed = "<think> First add the two numbers, 然后我们把这个和乘以三得到结果是九。 </think> <answer> 9 </answer>"
    assert mixed_language([en, mixed], ["", ""], 0.95, language="en") == [False, True]
    assert mixed_language(["<think> 2 + 3 = 5 </think>"], [""], 0.95, language="en") == [False]  # no words: passes
    keep = {"accuracy": 1.0, "language": 0.9}
    assert fails_keep({"accuracy": 1.0, "language": None}, keep) is None  # language None: nothing to judge
    assert fails_keep({"accuracy": None, "language": 1.0}, keep) == "rejected:accuracy"  # unverifiable: dropped
    assert fails_keep({"accuracy": 1.0, "language": 0.5}, keep) == "rejected:language"


def test_precedence_counts_each_sample_once():
    checks = [("truncated", lambda idx: [i in (0, 1) for i in idx]), ("code_block", lambda idx: [i in (1, 2) for i in idx])]
    assert first_reasons(4, checks) == ["truncated", "truncated", "code_block", None]


def test_default_keep_rule_and_config_errors():
    cfg = RejectConfig.model_validate({"rewards": [{"name": "accuracy"}, {"name": "format"}, {"name": "language"}]})
    assert keep_rule(cfg, ["accuracy", "format", "language"]) == {"accuracy": 1.0, "format": 1.0, "language": 0.95}
    with pytest.raises(ValueError, match="keep names reward 'acc'"):
        RejectConfig.model_validate({"keep": {"acc": 1.0}})
    with pytest.raises(ValueError, match="default keep rule"):
        RejectConfig.model_validate({"rewards": [{"name": "repetition"}]})


def test_dedup_and_cap():
    a = "add two and three to get five then double it to get ten"
    texts = [a + " done", a, "multiply first then add the rest and the result is ten", "ten is the answer here plainly"]
    lengths = [13, 12, 11, 6]
    # a and a + " done" are near-identical: the longer one is the duplicate
    assert select(texts, lengths, 0.8, 3, None, "shortest") == ["duplicate", None, None, None]
    assert select(texts, lengths, None, 3, None, "shortest") == [None] * 4  # dedup off
    assert select(texts, lengths, 0.8, 3, 2, "shortest") == ["duplicate", "cap", None, None]
    # diverse: from the shortest, add the trace least like those chosen (not the near-copy of a)
    near = ["ten is the answer here plainly", "ten is the answer here plainly ok", "a wholly different line of thought"]
    assert select(near, [6, 7, 8], None, 3, 2, "diverse") == [None, "cap", None]
    assert select(near, [6, 7, 8], None, 3, 2, "shortest") == [None, None, "cap"]


def test_decontamination_by_ngrams():
    evals = ["Compute 2 - 1 + 5 - 1", "Natalia sold clips to 48 of her friends in April, and then she sold half as many"]
    prompts = ["compute 2 - 1 + 5 - 1", "Compute 2 - 1 + 5 - 2",  # short: compared whole, case-blind
               "Q: Natalia sold clips to 48 of her friends in May", "Tom sold apples to 12 friends"]
    assert contaminated(prompts, evals, 8) == [True, False, True, False]
    assert contaminated(prompts, [], 8) == [False] * 4


# ---------------------------------------------------------------- the stage on a tiny model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("reject") / "m")


def _config(tmp: Path, ckpt: Path, **extra) -> Path:
    """A reward most untrained samples can meet half the time (an even number of tokens), so the keep rule splits."""
    (tmp / "even.py").write_text(EVEN)
    cfg = {"model": str(ckpt), "data": {"num_examples": 8}, "samples_per_prompt": 4, "shard_size": 2,
           "sampling": {"temperature": 1.0, "max_tokens": 24, "stop": ["."]},
           "rewards": [{"name": f"{tmp / 'even.py'}:even"}], "keep": {"even": 1.0},
           "filters": {"mixed_language": False}, **extra}
    path = tmp / "reject.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {p: (out / p).read_bytes() for p in ("data/train.jsonl", "data/train.parquet", "stats.json")}


def test_cli_accounts_for_every_sample_and_sigkill_resume_is_byte_identical(ckpt, tmp_path, one_thread):
    """~40 s: an uninterrupted `r1 reject`, then a subprocess killed after its first shard, then the rerun."""
    cfg = _config(tmp_path, ckpt)
    assert cli_main(["reject", str(cfg), "--output", str(tmp_path / "ref")]) == 0
    stats = json.loads((tmp_path / "ref" / "stats.json").read_text())
    assert stats["samples"] == 8 * 4 and stats["kept"] + sum(stats["dropped"].values()) == stats["samples"]
    assert 0 < stats["kept"] < 32 and stats["dropped"]["rejected:even"] > 0
    assert sum(stats["pass_rate"]["histogram"].values()) == 8 and stats["tokens_per_kept"]["max"] <= 24
    import datasets

    ds = datasets.Dataset.from_parquet(str(tmp_path / "ref" / "data" / "train.parquet"))
    assert len(ds) == stats["kept"] and {"prompt", "completion", "answer", "rewards", "source_model"} <= set(ds.column_names)
    assert all(r["rewards"]["even"] == 1.0 and r["source_model"] == str(ckpt) for r in ds)
    assert [json.loads(line) for line in (tmp_path / "ref" / "data" / "train.jsonl").read_text().splitlines()] == ds.to_list()

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "grpo.cli", "reject", str(cfg), "--output", str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=(tmp_path / "killed.err").open("w"))
    deadline = time.time() + 300
    while not (out / "shards" / "shard-00000" / "stats.json").is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-2000:]  # killed, not failed or done
    done = sorted(d.name for d in (out / "shards").glob("shard-*"))
    assert not (out / "stats.json").exists() and 1 <= len(done) < 4, done  # the kill landed mid-run
    assert cli_main(["reject", str(cfg), "--output", str(out)]) == 0
    assert _files(out) == _files(tmp_path / "ref")
    assert not [p.name for p in (out / "shards").iterdir() if ".tmp-" in p.name]  # no debris of the killed write


def test_recipe_stage_decontaminates_and_bad_input_is_one_line(ckpt, tmp_path, one_thread, capsys):
    """~15 s: `kind: reject` in a recipe, with one training prompt in the eval set; then the error cases."""
    train = load_rows(DataConfig(num_examples=8))
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(json.dumps({"question": train[3]["prompt"]}) + "\n")
    cfg = yaml.safe_load(_config(tmp_path, ckpt, max_per_prompt=1).read_text())
    cfg["decontaminate"] = [{"source": str(evalset), "prompt_column": "question"}]
    cfg["filters"] = {"mixed_language": True, "language": "en"}  # wired in (tau 0 keeps all: untrained text is noise)
    cfg["language_threshold"] = 0.0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "rs", "output_dir": str(tmp_path / "run"), "stages": ["distil_data"],
                                      "distil_data": {"kind": "reject", **cfg}}))
    pipeline.run(load_recipe(str(recipe)))
    stats = json.loads((tmp_path / "run" / "00-distil_data" / "stats.json").read_text())
    assert stats["contaminated_prompts"] == 1 and stats["dropped"]["contaminated"] == 4
    assert stats["kept"] + sum(stats["dropped"].values()) == 32 and stats["dropped"]["cap"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "00-distil_data" / "data" / "train.jsonl").read_text().splitlines()]
    assert 3 not in {r["prompt_index"] for r in rows} and len(rows) == len({r["prompt_index"] for r in rows})

    missing = _config(tmp_path, ckpt, decontaminate=[{"source": str(tmp_path / "nope.jsonl")}])
    assert cli_main(["reject", str(missing), "--output", str(tmp_path / "m")]) == 2  # preflight, before any model
    assert "reject.decontaminate.0.source: file" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 0 has no column 'prompt'"):
        from grpo.reject import run

        run(RejectConfig.model_validate({**cfg, "data": {"source": str(bad)}}), str(ckpt), tmp_path / "b")
    with pytest.raises(DataError, match=r"no sample kept of 8 \(.*rejected:even dropped"):
        run(RejectConfig.model_validate({**cfg, "data": {"num_examples": 2}, "keep": {"even": 2.0}}), str(ckpt), tmp_path / "e")
    changed = _config(tmp_path, ckpt, seed=5)
    with pytest.raises(ConfigError, match="another config"):  # shards of another config are never mixed in
        run(RejectConfig.model_validate(yaml.safe_load(changed.read_text())), str(ckpt), tmp_path / "e")
