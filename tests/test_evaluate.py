"""Evaluation metrics on a real (tiny, untrained) model: pass@1, pass@k and cons@k relate as they must."""

from grpo.config import EvalConfig
from grpo.evaluate import evaluate, last_number_correct
from tests.helpers import tiny_checkpoint


def test_metrics_bounds_and_keys(tmp_path):
    ck = tiny_checkpoint(tmp_path / "m")
    cfg = EvalConfig.model_validate({"data": {"num_examples": 8, "split": "test"}, "k": 3, "sampling": {"max_tokens": 8}})
    m = evaluate(cfg, str(ck))
    assert m["problems"] == 8 and m["samples"] == 24
    assert 0.0 <= m["pass@1"] <= m["pass@3"] <= 1.0 and 0.0 <= m["cons@3"] <= m["pass@3"]
    assert set(m) >= {"format", "last_number_acc", "mean_length"} and m["mean_length"] <= 8


def test_last_number_is_format_blind():
    assert last_number_correct("3 + 4 = 7. The answer is 7.", "7") == 1.0
    assert last_number_correct("<answer> 12 </answer>", "12.0") == 1.0
    assert last_number_correct("7 then 8", "7") == 0.0 and last_number_correct("none", "7") == 0.0
