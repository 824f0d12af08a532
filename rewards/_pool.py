"""A pool of killable verification worker processes with a per-item deadline.

Why not math-verify's own timeout: it uses SIGALRM, which only works in the main thread, so it is off in
trainer threads, and it cannot interrupt C code. Why not multiprocessing.Pool: its workers cannot be killed
per task, and daemonic processes (a multiprocessing.Pool worker) may not start children. So: one plain
subprocess per trainer process (a zygote that has imported and warmed sympy) forks workers that speak JSON
lines over sockets; a deadline measured here with poll(); on expiry the caller gets a timeout and an idle or
freshly forked (~10 ms) worker at once, and the late one is SIGKILLed unless it answers within a grace. No
signal is used in the caller, so the deadline holds in the main thread, worker threads, subprocesses, daemonic
pool workers and every rank of a distributed run (each process gets its own pool, rebuilt after fork).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

_WORKER = str(Path(__file__).with_name("_mathworker.py"))
GRACE_S = 2.0  # how long a worker past its deadline may still finish before it is killed


class _Worker:
    """One worker process (forked by the zygote) and its socket; `task` is the index in flight, `t0` when sent."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid, self.sock, self.buf, self.ready, self.task, self.t0 = pid, sock, b"", False, None, 0.0
        self.fd = sock.fileno()

    def send(self, idx: int, req: dict) -> None:
        self.task, self.t0 = idx, time.monotonic()
        self.sock.sendall((json.dumps({**req, "id": idx}) + "\n").encode())

    def read_lines(self) -> list[dict] | None:
        """Complete JSON lines now available; None at EOF (the worker died)."""
        try:
            chunk = self.sock.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.sock.close()


class VerifyPool:
    """`size` long-lived workers shared by every thread of this process. `map(reqs, deadline)` returns one
    result dict per request, in order; an item past its deadline gets {"score": 0.0, "why": "timeout"}."""

    def __init__(self, size: int | None = None):
        self.size = size or int(os.environ.get("R1KIT_VERIFY_WORKERS", 0)) or max(2, min(os.cpu_count() or 2, 8))
        self.max_size = 2 * self.size + 2  # busy threads may fork extra workers (cheap: the zygote forks them)
        self.pid = os.getpid()
        self._idle: deque[_Worker] = deque()
        self._live: set[_Worker] = set()
        self._aside: list[tuple[_Worker, float]] = []  # past their deadline: (worker, SIGKILL time)
        self._lock = threading.Condition()
        self._zlock = threading.Lock()
        self._zygote: subprocess.Popen | None = None
        # The zygote is started from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that forked
        # a child exits, and callers may be short-lived pool threads.
        self._spawn_q: queue.Queue = queue.Queue()
        threading.Thread(target=self._spawner, daemon=True, name="r1kit-verify-spawner").start()
        for _ in range(self.size):
            self._idle.append(self._spawn())

    def _spawner(self) -> None:
        while True:
            box, ev = self._spawn_q.get()
            try:
                ours, theirs = socket.socketpair()
                proc = subprocess.Popen([sys.executable, "-u", _WORKER, str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                theirs.close()
                box.append((proc, ours))
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                box.append(e)
            ev.set()

    def _start_zygote(self) -> None:
        box, ev = [], threading.Event()
        self._spawn_q.put((box, ev))
        ev.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        self._zygote, self._ctrl = box[0]
        self._ctrl_buf = b""
        if self._readline() != b"ready":
            raise RuntimeError("r1kit verification zygote failed to start (is math-verify installed?)")

    def _readline(self) -> bytes:
        while b"\n" not in self._ctrl_buf:
            chunk = self._ctrl.recv(4096)
            if not chunk:
                return b""
            self._ctrl_buf += chunk
        line, _, self._ctrl_buf = self._ctrl_buf.partition(b"\n")
        return line

    def _spawn(self) -> _Worker:
        """A fresh, already warm worker forked by the zygote (the zygote itself is restarted if it died)."""
        with self._zlock:
            for _ in range(2):
                if self._zygote is None or self._zygote.poll() is not None:
                    self._start_zygote()
                ours, theirs = socket.socketpair()
                try:
                    socket.send_fds(self._ctrl, [b"w"], [theirs.fileno()])
                    pid = int(self._readline() or 0)
                except OSError:
                    pid = 0
                theirs.close()
                if pid:
                    w = _Worker(pid, ours)
                    self._live.add(w)
                    return w
                ours.close()
                self._zygote.kill()
            raise RuntimeError("r1kit verification zygote keeps failing")

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self._live.discard(w)
        return self._spawn()

    def _set_aside(self, w: _Worker) -> _Worker:
        """A worker past its deadline: the caller moves on at once with an idle or newly forked worker, while
        this one gets GRACE_S to answer (its own timer usually ends the item, and it keeps its warm caches;
        killing it on every deadline under CPU contention made fresh workers slower and time out more)."""
        with self._lock:
            self._aside.append((w, time.monotonic() + GRACE_S))
            spare = self._idle.popleft() if self._idle else None
        return spare or self._spawn()

    def _reap(self) -> None:
        """Workers set aside: back to idle once they answered, SIGKILLed when their grace is over (C hangs)."""
        with self._lock:
            aside, self._aside = self._aside, []
        keep = []
        for w, kill_at in aside:
            poller = select.poll()
            poller.register(w.fd, select.POLLIN)
            if poller.poll(0):
                lines = w.read_lines()
                if lines is not None and any(m.get("id") == w.task for m in lines):
                    w.task = None
                    if len(self._live) > self.max_size:
                        w.kill()
                        self._live.discard(w)
                    else:
                        self._release([w])
                    continue
                if lines is None:
                    w.kill()
                    self._live.discard(w)
                    continue
            if time.monotonic() > kill_at:
                w.kill()
                self._live.discard(w)
            else:
                keep.append((w, kill_at))
        with self._lock:
            self._aside.extend(keep)

    def _checkout(self, want: int, block: bool) -> list[_Worker]:
        """Take up to `want` idle workers. `block`: the caller holds none, so it gets at least one; a new one
        is forked when all are busy (other threads) and the pool is below max_size, else it waits."""
        with self._lock:
            got = []
            while self._idle and len(got) < want:
                got.append(self._idle.popleft())
            grow = block and not got and len(self._live) < self.max_size
            if block and not got and not grow:
                self._lock.wait_for(lambda: self._idle)
                got.append(self._idle.popleft())
        if grow:
            got.append(self._spawn())
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
        self._reap()
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
                poller = select.poll()  # poll, not select: a big trainer may hold fds above FD_SETSIZE
                for w in held:
                    poller.register(w.fd, select.POLLIN)
                readable = {fd for fd, _ in poller.poll(wait * 1000)}
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
                        held[held.index(w)] = self._set_aside(w)
        finally:
            for w in list(held):
                if w.task is not None:  # interrupted mid-item (KeyboardInterrupt): its answer would be stale
                    held.remove(w)
                    with self._lock:
                        self._aside.append((w, time.monotonic() + GRACE_S))
            self._release(held)
            self._reap()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in list(self._live):
            w.kill()
        self._live.clear()
        self._idle.clear()
        if self._zygote is not None:
            self._zygote.kill()
            self._zygote.wait()


_POOL: VerifyPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> VerifyPool:
    """The process's pool, started on first use and rebuilt in a forked child (sockets do not survive fork)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = VerifyPool()
        return _POOL


@atexit.register
def _shutdown() -> None:
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()

