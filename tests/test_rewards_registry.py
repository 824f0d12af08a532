"""Registry, RewardSet and plug-in rewards: TRL's documented rewards run unchanged, specs resolve from every
source (registry, pkg.mod:fn, path.py:fn, entry point), async rewards overlap, weights and None follow TRL's
rules, metrics carry TRL's names plus timeouts/errors, and `r1 rewards list|score` work."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

import rewards
from rewards.cli import main as cli_main
from rewards.runner import RewardSet

# Copied verbatim from TRL's GRPOTrainer documentation ("Using a custom reward function").
TRL_DOC_REWARDS = '''
import re

def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]

def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \\boxed{}
    matches = [re.search(r"\\\\boxed\\{(.*?)\\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
'''


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_trl_documented_rewards_run_unchanged(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(TRL_DOC_REWARDS)
    rs = RewardSet.from_specs([{"name": f"{f}:format_reward_func", "weight": 0.5}])
    comps = [chat("<think>7*5</think><answer>35</answer>"), chat("35")]
    total, per = rs(comps, [chat("q"), chat("q")])
    assert per["format_reward_func"] == [1.0, 0.0] and total == [0.5, 0.0]
    rs = RewardSet.from_specs([{"name": f"{f}:reward_func"}])
    total, per = rs(["so \\boxed{35}", "\\boxed{34}"], ["q", "q"], ground_truth=["35", "35"],
                    completion_ids=[[1, 2], [3]])
    assert total == [1.0, 0.0]
    m = RewardSet.metrics(per)
    assert m["rewards/reward_func/mean"] == 0.5 and "rewards/reward_func/std" in m


def test_trl_library_reward_by_module_path():
    """`pkg.module:function`: TRL's own accuracy reward, fed the `solution` column it expects."""
    rs = RewardSet.from_specs([{"name": "trl.rewards:accuracy_reward"}])
    total, per = rs([chat("\\boxed{\\frac{1}{3}}"), chat("\\boxed{\\frac{1}{2}}")], [chat("q")] * 2,
                    solution=["\\frac{1}{3}", "\\frac{1}{3}"])
    assert per["accuracy_reward"] == [1.0, 0.0]


def test_entry_point_reward(tmp_path, monkeypatch):
    pkg = tmp_path / "thirdparty_rewards.py"
    pkg.write_text("def brevity(completions, **kw):\n    return [1.0 / (1 + len(str(c))) for c in completions]\n")
    dist = tmp_path / "thirdparty_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[r1kit.rewards]\nbrevity = thirdparty_rewards:brevity\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "brevity" in rewards.names()
    total, _ = RewardSet.from_specs([{"name": "brevity"}])(["abc"], ["q"])
    assert total == [0.25]


def test_register_and_errors():
    @rewards.register("test_registry_const")
    def const(completions, **kw):
        return [0.5] * len(completions)

    assert rewards.get("test_registry_const") is const
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("test_registry_const")(lambda completions, **kw: [])
    with pytest.raises(KeyError, match="did you mean 'accuracy'"):
        rewards.get("acuracy")
    with pytest.raises(FileNotFoundError):
        rewards.resolve("no/such/file.py:fn")
    with pytest.raises(AttributeError):
        rewards.resolve("rewards.shaping:nope")

    @rewards.register("test_registry_short")
    def short(completions, **kw):
        return [1.0]

    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        RewardSet.from_specs([{"name": "test_registry_short"}])(["a", "b"], ["q", "q"])


def test_async_rewards_run_concurrently():
    @rewards.register("test_registry_slow_a")
    async def slow_a(completions, **kw):
        await asyncio.sleep(0.6)
        return [1.0] * len(completions)

    @rewards.register("test_registry_slow_b")
    async def slow_b(completions, **kw):
        await asyncio.sleep(0.6)
        return [2.0] * len(completions)

    rs = RewardSet.from_specs([{"name": "test_registry_slow_a"}, {"name": "test_registry_slow_b", "weight": 0.5},
                               {"name": "format"}])
    t0 = time.monotonic()
    total, per = rs(["<think>a</think><answer>1</answer>"], ["q"])
    assert time.monotonic() - t0 < 1.1  # two 0.6 s rewards overlapped
    assert total == [1.0 + 1.0 + 1.0]


def test_weights_none_labels_and_metrics():
    @rewards.register("test_registry_none_for_odd")
    def none_for_odd(completions, **kw):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    rs = RewardSet.from_specs([{"name": "test_registry_none_for_odd", "weight": 2.0},
                               {"name": "format", "weight": 0.5}, {"name": "format", "weight": 1.0,
                                                                   "kwargs": {"variant": "tag_count"}}])
    assert rs.labels == ["test_registry_none_for_odd", "format", "format_2"]
    total, per = rs(["<think>a</think><answer>1</answer>", "nothing"], ["q", "q"])
    assert total == [2.0 + 0.5 + 1.0, 0.0]
    m = rs.metrics(per)
    assert m["rewards/test_registry_none_for_odd/mean"] == 1.0
    assert m["rewards/test_registry_none_for_odd/none_frac"] == 0.5
    assert m["rewards/format_2/mean"] == 0.5 and m["rewards/format/errors"] == 0.0


def test_on_error_none_counts_errors():
    @rewards.register("test_registry_broken")
    def broken(completions, **kw):
        raise IndexError("bug in a user reward")

    with pytest.raises(IndexError):
        RewardSet.from_specs([{"name": "test_registry_broken"}])(["a"], ["q"])
    rs = RewardSet.from_specs([{"name": "test_registry_broken", "on_error": "none"}, {"name": "format"}])
    total, per = rs(["a", "b"], ["q", "q"])
    assert per["test_registry_broken"] == [None, None] and total == [0.0, 0.0]
    assert rs.metrics(per)["rewards/test_registry_broken/errors"] == 2.0


def test_builtins_take_strings_and_chat_messages():
    text = "<think> 3 + 4 = 7. 7 * 5 = 35. </think> <answer> 35 </answer>"
    for c in (text, chat(text)):
        assert rewards.get("accuracy")([c], ["q"], answer=["35"]) == [1.0]
        assert rewards.get("format")([c], ["q"]) == [1.0]
    # the lead's trainer call shape
    total, per = RewardSet.from_specs([{"name": "accuracy", "weight": 1.0, "kwargs": {}},
                                       {"name": "format", "weight": 0.2, "kwargs": {"variant": "strict"}}])(
        [text, "nope"], ["q", "q"], answer=["35", "35"], completion_ids=[[1], [2]])
    assert total == [1.2, 0.0] and set(per) == {"accuracy", "format"}


def test_shaping():
    ov = rewards.get("overlong")
    assert ov(["x"] * 4, None, max_len=100, cache_len=20, completion_ids=[[0] * 80, [0] * 90, [0] * 100,
                                                                          [0] * 101]) == [0.0, -0.5, -1.0, -1.0]
    cos = rewards.get("cosine")
    right, wrong = "<think>a</think><answer>35</answer>", "<think>a</think><answer>36</answer>"
    s = cos([right, right, wrong, wrong], None, answer=["35"] * 4, max_len=100,
            completion_ids=[[0], [0] * 100, [0], [0] * 100])
    assert s[0] == pytest.approx(1.0, abs=1e-3) and s[1] == pytest.approx(0.5)  # short right beats long right
    assert s[2] == pytest.approx(-1.0, abs=1e-3) and s[3] == pytest.approx(-0.5)  # long wrong beats short wrong
    assert cos([right], None, answer=["\\frac{"]) == [None]
    rep = rewards.get("repetition")
    r = rep(["a b c d e f g h", "a b c a b c a b c a b c", ""], None, ngram=3, max_penalty=-1.0)
    assert r[0] == 0.0 and r[2] == 0.0 and -1.0 < r[1] < -0.5


def test_code_reward_formats():
    code = rewards.get("code")
    prog = "<think>p</think>\n```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```"
    apps = json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "8\n"]})
    call = [{"fn_name": "f", "args": [2], "output": 4}, {"fn_name": "f", "args": [3], "output": 9}]
    sq = "<think>p</think>\n```python\ndef f(x):\n    return x * x\n```"
    assert code([prog, prog, sq, "no code here", prog], None,
                tests=[apps, [{"input": "1 2", "output": "3"}], call, call, []]) == [0.5, 1.0, 1.0, 0.0, None]
    assert code([prog], None, tests=[apps], mode="binary") == [0.0]


def test_cli_list_and_score(tmp_path, capsys):
    rows = [{"prompt": "q", "completion": "<think>a</think><answer>35</answer>", "answer": "35"},
            {"prompt": "q", "completion": "<think>a</think><answer>5 or 35</answer>", "answer": "35"},
            {"prompt": "q", "completion": chat("<think>a</think><answer>1</answer>"), "answer": "\\frac{"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("accuracy", "format", "language", "code", "overlong", "cosine", "repetition"))
    assert cli_main(["score", "--reward", "accuracy,format", "--data", str(data), "--kwargs",
                     '{"format": {"variant": "soft"}}']) == 0
    out = capsys.readouterr().out
    assert "0.5000" in out  # accuracy mean over the two rows where it applies
    assert "gold_unparsed=1" in out and "hedges=1" in out


def test_cli_is_importable_alone():
    import subprocess

    p = subprocess.run([sys.executable, "-c", "from rewards.cli import main; raise SystemExit(main(['list']))"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "accuracy" in p.stdout
