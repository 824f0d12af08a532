"""The `accuracy` reward is a function of (completion, gold) alone: scoring a batch, the same items shuffled,
one at a time, or in a fresh process gives the same scores. Regression: for gold `1000` the answer `1 000`
scored 0 on the first call and 1 on every later one (a shortcut learned from earlier calls)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import rewards

ROOT = Path(__file__).resolve().parent.parent

ITEMS = [  # (answer block, gold): right, wrong, hedged and unreadable ones, several sharing a gold
    ("1 000", "1000"), ("1000", "1000"), ("1,000", "1000"), ("1 001", "1000"), ("10 00", "1000"),
    ("1000", "1 000"), ("1,22", "1.22"), ("1.22", "1,22"), ("0,111", "0.111"), ("\\frac13", "\\frac{1}{3}"),
    ("\\sqrt3", "\\sqrt{3}"), ("\\frac94\\pi", "\\frac{9}{4}\\pi"),
    ("Therefore $x \\geq 5$ is the solution.", "x \\geq 5"),
    ("Final Answer: The largest $n$ is 34.", "34"), ("\\boxed{1} and \\boxed{2}", "\\{1, 2\\}"),
    ("\\boxed{1} and \\boxed{2}", "1"), ("5 or 7", "5"), ("(1, 2]", "(1,2]"), ("[1, 2]", "(1,2]"),
    ("1000.99€", "1000.99"), ("$125$ miles", "125"), ("125", "$125$ miles"), ("35", "see solution"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}"),
]


def _score(items):
    return rewards.get("accuracy")([f"<think>t</think><answer>{a}</answer>" for a, _ in items], None,
                                   answer=[g for _, g in items], deadline=10.0)


def test_fresh_process_first_call_equals_later_calls():
    """In a new process: `1 000` against gold `1000` first, then the whole list, then one by one."""
    code = ("import json, sys, rewards\n"
            "items = json.load(sys.stdin)\n"
            "score = lambda its: rewards.get('accuracy')(\n"
            "    ['<think>t</think><answer>' + a + '</answer>' for a, _ in its], None, answer=[g for _, g in its],\n"
            "    deadline=10.0)\n"
            "first = score(items[:1])\n"
            "print(json.dumps([first, score(items), [score([it])[0] for it in items]]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ITEMS), capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300, check=True).stdout
    first, batch, single = json.loads(out.strip().splitlines()[-1])
    assert first == [1.0], "gold 1000, answer '1 000' on the first call of a process"
    assert batch == single, list(zip(ITEMS, batch, single))
    here = _score(ITEMS)
    assert here == batch, [(it, a, b) for it, a, b in zip(ITEMS, here, batch) if a != b]


def test_batch_shuffled_and_single_agree():
    batch = _score(ITEMS)
    order = list(range(len(ITEMS)))
    random.Random(0).shuffle(order)
    shuffled = _score([ITEMS[i] for i in order])
    assert [shuffled[order.index(i)] for i in range(len(ITEMS))] == batch
    single = [_score([it])[0] for it in ITEMS]
    assert single == batch, [(it, a, b) for it, a, b in zip(ITEMS, batch, single) if a != b]
    again = _score(ITEMS)
    assert again == batch
    assert batch[:5] == [1.0, 1.0, 1.0, 0.0, 0.0]  # 1 000 = 1000 always; 1 001 and 10 00 never
