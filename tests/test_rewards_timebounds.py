"""Verification deadlines hold everywhere: main thread, worker threads, a multiprocessing pool (daemonic
processes) and both ranks of a real 2-process torchrun run. Each pathological answer scores 0 in under 2 s of
wall time and the good answer beside it in the same batch still scores 1 (the step continues)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rewards
from rewards._pool import get_pool

PATHOLOGICAL = {
    "power tower": "9^{9^{9^{9}}}",
    "huge factorial": "(10^{10^{10}})!",
    "nested radicals": "\\sqrt{" * 300 + "2" + "}" * 300,
    "100 kB answer": "1+" * 50_000 + "1",
    "huge power": "2^{2^{30}}",
}
BUDGET_S = 2.0


def batch(pred: str, k: int = 7):
    """A pathological completion beside a correct one."""
    return [f"<think>hm</think><answer>{pred}</answer>", f"<think>ok</think><answer>{k}</answer>"], ["5", str(k)]


def timed(pred: str, **kw):
    comps, golds = batch(pred)
    t0 = time.monotonic()
    scores = rewards.get("accuracy")(comps, None, answer=golds, **kw)
    return scores, time.monotonic() - t0


def _warm():
    """Start this process's verification pool (once per process, like a trainer's first step)."""
    assert rewards.get("accuracy")(["<answer>0.5</answer>"], None, answer=["\\frac{1}{2}"]) == [1.0]
    assert get_pool().size >= 2


@pytest.fixture(scope="module", autouse=True)
def warm():
    _warm()


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_main_thread(name):
    scores, wall = timed(PATHOLOGICAL[name], max_answer_chars=None)  # no length cap: the deadline must hold
    assert scores == [0.0, 1.0]
    assert wall < BUDGET_S, wall


def test_length_cap_answers_instantly():
    scores, wall = timed(PATHOLOGICAL["100 kB answer"])
    assert scores == [0.0, 1.0] and wall < 0.5


def test_hard_kill_replaces_a_worker_stuck_in_c():
    """With the worker's own soft timer off, only the pool's SIGKILL can end the item: the caller gets its
    timeout at the deadline, and the stuck worker is killed when its grace is over."""
    from rewards._pool import GRACE_S

    pool = get_pool()
    before = {w.pid for w in pool._live}
    t0 = time.monotonic()
    res = pool.map([{"gold": "5", "pred": "9^{387420489}", "soft_s": 0}, {"gold": "2", "pred": "x=2"}], deadline=1.0)
    assert time.monotonic() - t0 < BUDGET_S
    assert [r["why"] for r in res] == ["timeout", "ok"]
    stuck = [w.pid for w, _ in pool._aside]
    assert len(stuck) == 1 and stuck[0] in before
    time.sleep(GRACE_S + 0.2)
    assert pool.map([{"gold": "1/2", "pred": "0.5"}])[0]["score"] == 1.0  # the next call reaps it
    assert stuck[0] not in {w.pid for w in pool._live} and not pool._aside
    time.sleep(0.05)
    assert not Path(f"/proc/{stuck[0]}").exists() or "Z" in Path(f"/proc/{stuck[0]}/stat").read_text().split()[2]


def test_thread_pool():
    with ThreadPoolExecutor(max_workers=4) as ex:
        out = list(ex.map(lambda p: timed(p, max_answer_chars=None), list(PATHOLOGICAL.values()) * 2))
    for scores, wall in out:
        assert scores == [0.0, 1.0]
        assert wall < BUDGET_S, wall


def _mp_task(pred):
    return timed(pred, max_answer_chars=None)


def test_multiprocessing_pool():
    """multiprocessing.Pool workers are daemonic (they may not start multiprocessing children); each still
    gets its own verification pool and the deadline holds there."""
    with mp.get_context("fork").Pool(2, initializer=_warm) as pool:
        out = pool.map(_mp_task, list(PATHOLOGICAL.values()), chunksize=1)
    for scores, wall in out:
        assert scores == [0.0, 1.0]
        assert wall < BUDGET_S, wall


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun (from torch) is not on PATH")
def test_two_process_distributed_run():
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    script = Path(__file__).parent / "data" / "rewards_distributed.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # ranks left behind by a failure must not outlive the test
        except ProcessLookupError:
            pass
    assert p.returncode == 0, stderr[-3000:]
    ranks = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["n"] == 2
        assert all(s == [0.0, 1.0] for s in r["scores"]), r["scores"]
        assert max(r["walls"]) < BUDGET_S, r["walls"]
        assert r["gathered"] == 2 * len(r["scores"])  # both ranks reached the collective


def test_trainer_process_never_imports_sympy():
    """Parsing (and str() of parsed objects) happens only in workers: the trainer never even imports sympy."""
    code = ("import sys, rewards\n"
            "s = rewards.get('accuracy')(['<answer>\\\\frac{1}{2}</answer>', '<answer>x=2</answer>'], None,"
            " answer=['0.5', '2'])\n"
            "assert s == [1.0, 1.0], s\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sympy', 'math_verify', 'mpmath')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_counts_timeouts_in_metrics():
    rs = rewards.RewardSet.from_specs([{"name": "accuracy", "kwargs": {"max_answer_chars": None}}])
    comps, golds = batch(PATHOLOGICAL["power tower"])
    total, per = rs(comps, ["q", "q"], answer=golds)
    m = rs.metrics(per)
    assert total == [0.0, 1.0]
    assert m["rewards/accuracy/timeouts"] == 1.0 and m["rewards/accuracy/mean"] == 0.5
