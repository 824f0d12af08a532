"""Datasets: the synthetic tasks, file loading with column mapping, and errors that name the row and column."""

import hashlib
import json
import math
import re

import pytest

from grpo.config import ConfigError, DataConfig, load_stage
from grpo.data import DataError, load_rows
from grpo.data.synthetic import arithmetic_lang_rows, arithmetic_rows
from grpo.data.tokenizer import train_bpe
from rewards import RewardSet
from rewards.language import words


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


# ---- synthetic:arith_lang ----

# sha256 of json.dumps(arithmetic_rows(*args)), computed before synthetic:arith_lang was added
ARITH_HASHES = {
    ("train", 500, 3, 2, 3, 0.5): "8d28e987312d2bb2a5fa1b2ca837b1e591cd4626c0773c8e4fe73eeea69b4cc2",
    ("test", 200, 0, 4, 5, 1.0): "e7b916ca460156410b9b76482726b2a46b87f646b02fd942faad1855244cabbb",
    ("train", 1000, 0, 2, 3, 0.3): "a839880bfee4a7c0fe6175b6db6773b0acdc183b5704cab71b8b0655016622cf",
}
# the phrasing, written out here independently of the generator: (opener, a, op word, b, result)
STEP = {"en": r"(First|Then), we take (\d+) (plus|minus|times) (\d+), which gives us (\d+)\.",
        "de": r"(Zuerst|Dann) rechnen wir (\d+) (plus|minus|mal) (\d+), und das Ergebnis ist (\d+)\.",
        "fr": r"(D'abord|Ensuite), nous calculons (\d+) (plus|moins|fois) (\d+), et le résultat est (\d+)\."}
FINAL = {"en": r"So we see that the answer is (\d+)\.", "de": r"Also ist die Antwort auf die Aufgabe (\d+)\.",
         "fr": r"Donc la réponse finale est bien (\d+)\."}
PROMPT = {"en": r"Compute (.+) and answer in English", "de": r"Berechne (.+) und antworte auf Deutsch",
          "fr": r"Calcule (.+) et réponds en français"}
OPS = {"plus": "+", "minus": "-", "times": "*", "mal": "*", "moins": "-", "fois": "*"}


def _sentences(row) -> tuple[list[tuple[str, str]], bool]:
    """([(language, sentence)] of the worked text in order, tagged?); fails unless the text is exactly that."""
    sol = row["solution"]
    tagged = sol.startswith("<think> ")
    if tagged:
        m = re.fullmatch(r"<think> (.+) </think> <answer> (\d+) </answer>", sol)
        assert m and m.group(2) == row["answer"], sol
        sol = m.group(1)
    out = []
    for s in re.split(r"(?<=\.) ", sol):
        langs = [lang for lang in STEP if re.fullmatch(STEP[lang], s) or re.fullmatch(FINAL[lang], s)]
        assert len(langs) == 1, s
        out.append((langs[0], s))
    return out, tagged


def _check_row(row) -> int:
    """The row's chain is right, in the languages `cot_langs` says; returns its number of steps."""
    sents, tagged = _sentences(row)
    assert [lang for lang, _ in sents] == row["cot_langs"].split()
    steps = sents if tagged else sents[:-1]
    value = None
    for i, (lang, s) in enumerate(steps):
        opener, a, op, b, c = re.fullmatch(STEP[lang], s).groups()
        assert (opener in ("First", "Zuerst", "D'abord")) == (i == 0)
        assert value is None or int(a) == value
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[OPS[op]]
        assert value == int(c)
    if not tagged:
        assert re.fullmatch(FINAL[sents[-1][0]], sents[-1][1]).group(1) == row["answer"]
    assert str(value) == row["answer"]
    expr = re.fullmatch(PROMPT[row["lang"]], row["prompt"]).group(1)  # asked in the target language
    assert eval(expr) == value
    return len(steps)


def _expr(row) -> str:
    return re.fullmatch(PROMPT[row["lang"]], row["prompt"]).group(1)


def test_arith_unchanged_byte_for_byte():
    for args, want in ARITH_HASHES.items():
        assert hashlib.sha256(json.dumps(arithmetic_rows(*args)).encode()).hexdigest() == want, args


def test_arith_lang_is_seeded_correct_and_split_disjoint():
    kw = dict(languages=("en", "de", "fr"), mixed_fraction=0.3, tagged_fraction=0.5)
    a = arithmetic_lang_rows("train", 400, seed=3, **kw)
    assert a == arithmetic_lang_rows("train", 400, seed=3, **kw)
    assert a != arithmetic_lang_rows("train", 400, seed=4, **kw)
    for r in a:
        _check_row(r)
    train = {_expr(r) for r in a}
    assert len(train) == 400
    # the held-out split is disjoint from train whatever either's ops range: 3-op problems exist in both ranges
    for lo, hi in ((2, 3), (3, 4), (4, 5)):
        test = arithmetic_lang_rows("test", 200, seed=3, min_ops=lo, max_ops=hi, **kw)
        for r in test:
            _check_row(r)
        held = {_expr(r) for r in test}
        assert len(held) == 200 and not held & train, (lo, hi)
    wide = {_expr(r) for r in arithmetic_lang_rows("train", 1500, seed=3, min_ops=2, max_ops=5, **kw)}
    hard = {_expr(r) for r in arithmetic_lang_rows("test", 300, seed=3, min_ops=2, max_ops=5, **kw)}
    assert not wide & hard
    # the split is the synthetic:arith one: held-out arith_lang problems are unseen by an arith-trained model
    arith = arithmetic_rows("train", 3000, min_ops=2, max_ops=5)
    assert not hard & {r["prompt"].removeprefix("Compute ") for r in arith}


def test_arith_lang_difficulty_sets_step_counts():
    easy = [_check_row(r) for r in arithmetic_lang_rows("train", 300, min_ops=2, max_ops=3, tagged_fraction=0.5)]
    hard = [_check_row(r) for r in arithmetic_lang_rows("test", 100, min_ops=4, max_ops=5, tagged_fraction=0.5)]
    assert set(easy) == {2, 3} and set(hard) == {4, 5}


def _reward_columns(rows):
    """What the trainer passes to rewards: every column but the prompt."""
    return {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}


def test_language_reward_scores_each_language_and_measures_mixing():
    rs = RewardSet.from_specs([{"name": "language"}])
    for split, lo, hi in (("train", 2, 3), ("test", 4, 5)):
        rows = load_rows(DataConfig(source="synthetic:arith_lang", split=split, num_examples=150, min_ops=lo,
                                    max_ops=hi, languages=["en", "de", "fr"], mixed_fraction=0.5, tagged_fraction=0.5,
                                    completion_column="solution"))
        _, per = rs([r["solution"] for r in rows], [r["prompt"] for r in rows], **_reward_columns(rows))
        pure = {lang: [] for lang in STEP}
        mixed = []
        for r, score in zip(rows, per["language"]):
            sents, _ = _sentences(r)
            # each sentence has 6+ words, so lingua judges it alone: the score is the share of words in
            # target-language sentences, a ratio of the same integers the reward counts
            counts = [len(words(s)) for _, s in sents]
            assert min(counts) >= 6
            assert score == sum(n for n, (lang, _) in zip(counts, sents) if lang == r["lang"]) / sum(counts), r
            (pure[r["lang"]] if len({lang for lang, _ in sents}) == 1 else mixed).append(score)
        assert all(s >= 0.95 for scores in pure.values() for s in scores) and all(pure.values())
        assert mixed and all(0 < s < 0.95 for s in mixed) and sum(mixed) / len(mixed) < 0.7
        # the words are not just "some language": a pure chain scored against another target gets nothing
        solo = [r for r in rows if len(set(r["cot_langs"].split())) == 1]
        other = [{"en": "de", "de": "fr", "fr": "en"}[r["lang"]] for r in solo]
        _, per = rs([r["solution"] for r in solo], [r["prompt"] for r in solo], lang=other)
        assert all(s == 0.0 for s in per["language"])


def test_arith_lang_gold_tagged_solutions_score_one_on_accuracy_and_format():
    rows = load_rows(DataConfig(source="synthetic:arith_lang", num_examples=40, tagged_fraction=1.0,
                                languages=["en", "de", "fr"], mixed_fraction=0.5))
    rs = RewardSet.from_specs([{"name": "accuracy"}, {"name": "format"}])
    _, per = rs([r["solution"] for r in rows], [r["prompt"] for r in rows], **_reward_columns(rows))
    assert per["accuracy"] == [1.0] * 40 and per["format"] == [1.0] * 40
    wrong = [r["solution"].replace(f"<answer> {r['answer']} </answer>", f"<answer> {int(r['answer']) + 1} </answer>")
             for r in rows]
    _, per = rs(wrong, [r["prompt"] for r in rows], **_reward_columns(rows))
    assert per["accuracy"] == [0.0] * 40
    plain = arithmetic_lang_rows("train", 40, tagged_fraction=0.0)
    _, per = rs([r["solution"] for r in plain], [r["prompt"] for r in plain], **_reward_columns(plain))
    assert per["format"] == [0.0] * 40


def test_arith_lang_fractions_are_binomial():
    # each row draws tagged / target / mixed from its own stream, so counts are Binomial(n, p); 4 sigma on either
    # side misses with probability 6e-5 under that model, while a fraction off by 0.05 is 4.9 sigma out
    n, p = 2000, 0.3
    langs = ("en", "de", "fr")
    rows = arithmetic_lang_rows("train", n, languages=langs, mixed_fraction=p, tagged_fraction=0.5)
    k = sum(len(set(r["cot_langs"].split())) > 1 for r in rows)
    assert abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p)), k
    for lang in langs:
        m = sum(r["lang"] == lang for r in rows)
        assert abs(m - n / 3) <= 4 * math.sqrt(n * (1 / 3) * (2 / 3)), (lang, m)
    tagged = sum(r["solution"].startswith("<think>") for r in rows)
    assert abs(tagged - n / 2) <= 4 * math.sqrt(n / 4)
    # the fraction changes which rows mix and nothing else
    none = arithmetic_lang_rows("train", n, languages=langs, mixed_fraction=0.0, tagged_fraction=0.5)
    every = arithmetic_lang_rows("train", n, languages=langs, mixed_fraction=1.0, tagged_fraction=0.5)
    assert [r["prompt"] for r in none] == [r["prompt"] for r in rows] == [r["prompt"] for r in every]
    assert all(len(set(r["cot_langs"].split())) == 1 for r in none)
    assert all(len(set(r["cot_langs"].split())) > 1 for r in every)
    assert all(a == b for a, b in zip(rows, none) if len(set(a["cot_langs"].split())) == 1)


def test_arith_lang_config_errors(tmp_path):
    from typing import get_args

    from grpo.data.synthetic import NARRATION

    # the config's language codes are the narrated ones
    assert get_args(get_args(DataConfig.model_fields["languages"].annotation)[0]) == tuple(NARRATION)
    f = tmp_path / "sft.yaml"
    for data, msg in (('languages: [en, xx]', r"data\.languages\.1: Input should be 'en', 'de' or 'fr' \(got 'xx'\)"),
                      ('languages: [de, de]', r"data\.languages: a language appears twice"),
                      ('languages: [en], mixed_fraction: 0.2', r"data\.mixed_fraction: mixing needs two or more"),
                      ('min_ops: 1, mixed_fraction: 0.2', r"data\.mixed_fraction: .*min_ops is 1"),
                      ('mixed_fraction: 1.5', r"data\.mixed_fraction: Input should be less than or equal to 1")):
        f.write_text(f'data: {{source: "synthetic:arith_lang", {data}}}\n')
        with pytest.raises(ConfigError, match=msg):
            load_stage("sft", str(f))
    with pytest.raises(DataError, match=r"task 'synthetic:arith_de' \(have: synthetic:arith, synthetic:arith_lang\)"):
        load_rows(DataConfig(source="synthetic:arith_de"))
    # like min_ops, the fields are ignored by sources that do not use them
    g = tmp_path / "d.jsonl"
    g.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    rows = load_rows(DataConfig(source=str(g), languages=["fr", "de"], mixed_fraction=0.5))
    assert rows == [{"prompt": "q", "answer": "1"}]
