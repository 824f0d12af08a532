"""Datasets: the synthetic task, file loading with column mapping, and errors that name the row and column."""

import json

import pytest

from grpo.config import DataConfig
from grpo.data import DataError, load_rows
from grpo.data.synthetic import arithmetic_rows
from grpo.data.tokenizer import train_bpe


def test_synthetic_is_seeded_disjoint_and_correct():
    a = arithmetic_rows("train", 500, seed=3)
    assert a == arithmetic_rows("train", 500, seed=3)
    assert a != arithmetic_rows("train", 500, seed=4)
    test = arithmetic_rows("test", 300, seed=3)
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in test}) == 300
    for r in a + test:  # the worked steps chain and end at the gold answer
        steps = r["solution"].replace("<think>", "").split("</think>")[0].split("The answer")[0].strip().rstrip(".").split(". ")
        value = None
        for s in steps:
            lhs, rhs = s.split(" = ")
            x, op, y = lhs.split(" ")
            assert value is None or int(x) == value
            value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
            assert value == int(rhs)
        assert str(value) == r["answer"]
        assert eval(r["prompt"].removeprefix("Compute ")) == value  # the expression means what the steps do


def test_tagged_fraction():
    rows = arithmetic_rows("train", 1000, tagged_fraction=0.3)
    tagged = sum(r["solution"].startswith("<think>") for r in rows) / len(rows)
    assert 0.25 < tagged < 0.35
    assert all(r["solution"].endswith(f"<answer> {r['answer']} </answer>") for r in rows if r["solution"].startswith("<think>"))


def test_jsonl_column_mapping_and_passthrough(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}", "gold": str(i), "lang": "en"}) for i in range(5)))
    rows = load_rows(DataConfig(source=str(f), prompt_column="question", answer_column="gold", columns={"target_lang": "lang"}))
    assert [r["prompt"] for r in rows] == [f"q{i}" for i in range(5)]
    assert rows[2]["answer"] == "2" and rows[2]["target_lang"] == "en" and rows[2]["question"] == "q2"


def test_missing_column_names_row_and_column(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: row 1 has no column 'answer'"):
        load_rows(DataConfig(source=str(f)))
    f.write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_rows(DataConfig(source=str(f)))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(DataConfig(source=str(tmp_path / "nope.jsonl")))


def test_parquet_and_hf_datasets(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"problem": ["1+1", "2+2"], "solution": ["2", "4"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    rows = load_rows(DataConfig(source=str(tmp_path / "d.parquet"), prompt_column="problem", answer_column="solution"))
    assert [(r["prompt"], r["answer"]) for r in rows] == [("1+1", "2"), ("2+2", "4")]
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = load_rows(DataConfig(source=f"hf:{tmp_path / 'saved'}", prompt_column="problem", answer_column="solution"))
    assert len(rows) == 2
    with pytest.raises(DataError, match=r"row 0 has no column 'answer'"):
        load_rows(DataConfig(source=str(tmp_path / "d.parquet"), prompt_column="problem"))


def test_reasoning_gym_offline():
    rows = load_rows(DataConfig(source="reasoning_gym:basic_arithmetic", num_examples=5))
    assert len(rows) == 5 and all(r["prompt"] and r["answer"] for r in rows)
    assert rows != load_rows(DataConfig(source="reasoning_gym:basic_arithmetic", num_examples=5, split="test"))


def test_tokenizer_round_trips_and_splits_digits():
    rows = arithmetic_rows("train", 300)
    tok = train_bpe([r["prompt"] for r in rows] + [" " + r["solution"] for r in rows], vocab_size=400)
    text = " <think> 12 * 7 = 84. </think> <answer> 84 </answer> ünïcode"
    assert tok.decode(tok(text).input_ids) == text
    pieces = tok.convert_ids_to_tokens(tok("1234").input_ids)
    assert pieces == ["1", "2", "3", "4"]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
