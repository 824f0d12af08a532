"""A pool of killable verification worker processes with a per-item deadline.

Why not math-verify's own timeout: it uses SIGALRM, which only works in the main thread, so it is off in
trainer threads, and it cannot interrupt C code. Why not multiprocessing.Pool: its workers cannot be killed
per task, and daemonic processes (a multiprocessing.Pool worker) may not start children. So: plain
subprocesses speaking JSON lines, a deadline measured here with select(), SIGKILL and replace on expiry. No
signal is used in the caller, so the deadline holds in the main thread, worker threads, subprocesses, daemonic
pool workers and every rank of a distributed run (each process gets its own pool, rebuilt after fork).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

_WORKER = str(Path(__file__).with_name("_mathworker.py"))


class _Worker:
    """One worker process and its read buffer; `task` is the index in flight, `t0` when it was sent."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buf, self.ready, self.task, self.t0 = proc, b"", False, None, 0.0
        self.fd = proc.stdout.fileno()

    def send(self, idx: int, req: dict) -> None:
        self.task, self.t0 = idx, time.monotonic()
        self.proc.stdin.write((json.dumps({**req, "id": idx}) + "\n").encode())
        self.proc.stdin.flush()

    def read_lines(self) -> list[dict] | None:
        """Complete JSON lines now available; None at EOF (the worker died)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc.wait()


class VerifyPool:
    """`size` long-lived workers shared by every thread of this process. `map(reqs, deadline)` returns one
    result dict per request, in order; an item past its deadline gets {"score": 0.0, "why": "timeout"}."""

    def __init__(self, size: int | None = None):
        self.size = size or int(os.environ.get("R1KIT_VERIFY_WORKERS", 0)) or max(2, min(os.cpu_count() or 2, 8))
        self.pid = os.getpid()
        self._idle: deque[_Worker] = deque()
        self._live: set[_Worker] = set()
        self._lock = threading.Condition()
        # Workers are started from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that forked
        # a child exits, and callers may be short-lived pool threads.
        self._spawn_q: queue.Queue = queue.Queue()
        threading.Thread(target=self._spawner, daemon=True, name="r1kit-verify-spawner").start()
        for _ in range(self.size):
            self._idle.append(self._spawn())

    def _spawner(self) -> None:
        while True:
            box, ev = self._spawn_q.get()
            try:
                box.append(subprocess.Popen([sys.executable, "-u", _WORKER],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, close_fds=True))
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                box.append(e)
            ev.set()

    def _spawn(self) -> _Worker:
        box, ev = [], threading.Event()
        self._spawn_q.put((box, ev))
        ev.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        w = _Worker(box[0])
        self._live.add(w)
        return w

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self._live.discard(w)
        return self._spawn()

    def _checkout(self, want: int, block: bool) -> list[_Worker]:
        with self._lock:
            if block:
                self._lock.wait_for(lambda: self._idle, timeout=None)
            got = []
            while self._idle and len(got) < want:
                got.append(self._idle.popleft())
            return got

    def _release(self, ws: list[_Worker]) -> None:
        with self._lock:
            self._idle.extend(ws)
            self._lock.notify_all()

    def map(self, reqs: list[dict], deadline: float = 1.0) -> list[dict]:
        """Verify every request; each one in flight at most `deadline` seconds of wall time."""
        results: list[dict | None] = [None] * len(reqs)
        pending = deque(range(len(reqs)))
        held: list[_Worker] = []
        retried: set[int] = set()
        try:
            while pending or any(w.task is not None for w in held):
                if pending and len(held) < min(self.size, len(reqs)):
                    held += self._checkout(len(pending) - sum(w.task is None for w in held), block=not held)
                for w in held:
                    if w.ready and w.task is None and pending:
                        i = pending.popleft()
                        w.send(i, reqs[i])
                now = time.monotonic()
                busy = [w.t0 + deadline - now for w in held if w.task is not None]
                wait = max(0.0, min(busy)) if busy else 0.05
                readable, _, _ = select.select([w.fd for w in held], [], [], wait)
                for k, w in enumerate(list(held)):
                    if w.fd in readable:
                        lines = w.read_lines()
                        if lines is None:  # died (e.g. a crash in C): retry its item once on a fresh worker
                            if w.task is not None:
                                if w.task in retried:
                                    results[w.task] = {"score": 0.0, "why": "error", "error": "worker died"}
                                else:
                                    retried.add(w.task)
                                    pending.appendleft(w.task)
                            held[held.index(w)] = self._replace(w)
                            continue
                        for msg in lines:
                            if msg.get("ready"):
                                w.ready = True
                            elif msg.get("id") == w.task:
                                results[w.task] = msg
                                w.task = None
                now = time.monotonic()
                for w in list(held):
                    if w.task is not None and now - w.t0 > deadline:
                        results[w.task] = {"score": 0.0, "why": "timeout"}
                        held[held.index(w)] = self._replace(w)
        finally:
            for w in held:
                if w.task is not None:  # interrupted mid-item (KeyboardInterrupt): its answer would be stale
                    held[held.index(w)] = self._replace(w)
            self._release(held)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in list(self._live):
            w.kill()
        self._live.clear()
        self._idle.clear()


_POOL: VerifyPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> VerifyPool:
    """The process's pool, started on first use and rebuilt in a forked child (pipes do not survive fork)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = VerifyPool()
        return _POOL


@atexit.register
def _shutdown() -> None:
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()

