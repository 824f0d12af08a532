"""`code`: run the completion's Python program against the item's test cases in the sandbox (rewards.sandbox).

Tests (column `tests`, a list or its JSON string) in any of these shapes:
  [{"input": "1 2\\n", "output": "3\\n"}, ...]                      stdin/stdout
  [{"fn_name": "add", "args": [1, 2], "output": 3}, ...]             call-based (`fn(*args)` or Solution().fn)
  {"inputs": [...], "outputs": [...], "fn_name": optional}          APPS/TACO style
The program is the last ```python block after </think> (or in <answer>). Outputs are compared here, outside the
sandbox: stdout token by token (floats within 1e-6), call results after a JSON round trip. The program's exit
code and anything it prints about passing are ignored. Score: fraction of tests passed, or 1/0 with
`mode="binary"`; None when the item has no tests.
"""

from __future__ import annotations

import json
import math
import re

from rewards import _stats
from rewards._text import completion_text, split_think
from rewards.registry import register
from rewards.sandbox import Limits, run_many

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.S)


def extract_code(text: str, think_in_prompt: bool = False) -> str | None:
    """The last fenced code block after </think>; None if there is none."""
    _, tail = split_think(text, think_in_prompt)
    blocks = _FENCE.findall(tail)
    return blocks[-1] if blocks else None


def normalise_tests(tests) -> list[dict]:
    """Any accepted test format -> [{"stdin"| "fn","args"; "expected"}]."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, dict):
        fn = tests.get("fn_name")
        tests = [{"fn_name": fn, "args": i, "output": o} if fn else {"input": i, "output": o}
                 for i, o in zip(tests["inputs"], tests["outputs"])]
    out = []
    for t in tests or []:
        if t.get("fn_name"):
            out.append({"fn": t["fn_name"], "args": list(t.get("args", t.get("input", []))), "expected": t["output"]})
        else:
            out.append({"stdin": t.get("input", ""), "expected": t["output"]})
    return out


def _same_token(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)
    except ValueError:
        return False


def output_matches(got: str | None, test: dict) -> bool:
    """Compare one test's output with its expected value (here, in the grader)."""
    if got is None:
        return False
    if "fn" in test:
        try:
            return json.loads(got) == json.loads(json.dumps(test["expected"]))
        except (ValueError, TypeError):
            return False
    want = [line.split() for line in str(test["expected"]).strip().splitlines()]
    have = [line.split() for line in got.strip().splitlines()]
    return len(want) == len(have) and all(
        len(w) == len(h) and all(_same_token(x, y) for x, y in zip(w, h)) for w, h in zip(want, have))


@register("code")
def code_reward(completions, prompts=None, *, tests_column: str = "tests", mode: str = "fraction",
                limits: dict | None = None, backend: str = "auto", guard: bool = True, workers: int | None = None,
                think_in_prompt: bool = False, **columns) -> list[float | None]:
    """Fraction (or all-or-nothing with mode="binary") of the item's tests the program passes."""
    if tests_column not in columns:
        raise KeyError(f"code reward needs a {tests_column!r} column; got {sorted(columns)}")
    lim = Limits(**(limits or {}))
    items = [normalise_tests(t) for t in columns[tests_column]]
    progs = [extract_code(completion_text(c), think_in_prompt) for c in completions]
    todo = [i for i, (p, t) in enumerate(zip(progs, items)) if p is not None and t]
    runs = run_many([progs[i] for i in todo], [items[i] for i in todo], workers=workers, limits=lim,
                    backend=backend, guard=guard)
    by_item = dict(zip(todo, runs))
    out: list[float | None] = []
    for i, tests in enumerate(items):
        if not tests:
            out.append(None)
        elif i not in by_item:
            out.append(0.0)
        else:
            r = by_item[i]
            _stats.count("timeouts", int(r.timed_out))
            passed = sum(output_matches(o, t) for o, t in zip(r.outputs, tests))
            out.append(passed / len(tests) if mode == "fraction" else float(passed == len(tests)))
    return out
