"""The code sandbox under real attacks. Each attack must score 0 and leave the host intact, on every backend
this machine has: with the Python-level guard off (the OS layers alone) for the namespace backends, and with it
on for every backend. A correct program must still score 1 on each, so the zeros mean something."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards.code import code_reward, output_matches
from rewards.sandbox import Limits, available_backends, run_many, run_tests

LIMITS = {"cpu_s": 3, "wall_s": 8.0, "test_timeout_s": 1.5, "memory_mb": 256, "nproc": 24, "output_bytes": 1 << 16}
OS_BACKENDS = [b for b in available_backends() if b != "plain"]
COMBOS = [(b, False) for b in OS_BACKENDS] + [(b, True) for b in available_backends()]
IDS = [f"{b}-{'guard' if g else 'os-only'}" for b, g in COMBOS]


def _leftovers() -> list[int]:
    """Host processes still running a sandbox harness."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"boot.py" in cmd and b"-I" in cmd:
                out.append(int(p.name))
    return out


@pytest.fixture(autouse=True)
def host_clean():
    """After every test: no harness process survives (kill any, then fail), and the host can still fork."""
    yield
    left = _leftovers()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"sandbox processes survived: {left}"
    assert subprocess.run(["true"]).returncode == 0


def score(code: str, tests: list[dict], backend: str, guard: bool) -> float:
    completion = f"<think>plan</think>\n```python\n{code}\n```"
    return code_reward([completion], tests=[tests], backend=backend, guard=guard, limits=LIMITS)[0]


ADD = [{"input": "1 2\n", "output": "3\n"}]


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_correct_program_passes(backend, guard):
    code = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"
    assert score(code, ADD + [{"input": "5 7", "output": "12"}], backend, guard) == 1.0
    assert score("def add(a, b):\n    return a + b", [{"fn_name": "add", "args": [2, 3], "output": 5}],
                 backend, guard) == 1.0


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_fork_bomb(backend, guard):
    if backend == "plain" and os.geteuid() == 0 and not Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        pytest.skip("root ignores RLIMIT_NPROC; without a pids cgroup only the guard would stop this one")
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    assert score(code, ADD, backend, guard) == 0.0
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_memory_bomb(backend, guard):
    for code in ("x = bytearray(16 * 1024**3)\nprint(3)",
                 "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))\nprint(3)"):
        t0 = time.monotonic()
        assert score(code, ADD, backend, guard) == 0.0
        assert time.monotonic() - t0 < 8


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_infinite_loop(backend, guard):
    t0 = time.monotonic()
    assert score("while True:\n    pass", ADD, backend, guard) == 0.0
    assert time.monotonic() - t0 < LIMITS["test_timeout_s"] + 6  # loaded CI boxes are slow


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_read_secret_outside(backend, guard, tmp_path_factory):
    d = Path(f"/tmp/r1kit-secret-{uuid.uuid4().hex}")
    d.mkdir()
    try:
        token = uuid.uuid4().hex
        (d / "secret.txt").write_text(token)
        os.chmod(d, 0o755)
        os.chmod(d / "secret.txt", 0o644)  # world-readable: only isolation, not permissions, may stop this
        code = f"print(open({str(d / 'secret.txt')!r}).read())"
        # reading the secret would *pass*: the expected output is the secret itself
        assert score(code, [{"input": "", "output": token}], backend, guard) == 0.0
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_open_socket(backend, guard):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            got.append(conn.recv(100))
            conn.sendall(b"3\n")
            conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    port = srv.getsockname()[1]
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'pwned')\nprint(s.recv(10).decode().strip())")
    try:
        assert score(code, ADD, backend, guard) == 0.0  # the server's reply would be the right answer
        assert got == []
    finally:
        stop.set()
        th.join()
        srv.close()


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_write_outside(backend, guard):
    d = Path(f"/tmp/r1kit-out-{uuid.uuid4().hex}")
    d.mkdir()
    os.chmod(d, 0o777)  # world-writable: only isolation may stop this
    try:
        code = f"open({str(d / 'pwned.txt')!r}, 'w').write('x')\nopen('/tmp/pwned-{d.name}', 'w')\nprint(3)"
        assert score(code, ADD, backend, guard) == 0.0
        assert not (d / "pwned.txt").exists()
        assert not Path(f"/tmp/pwned-{d.name}").exists()
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_kill_parent_and_host_processes(backend, guard):
    canary = subprocess.Popen(["sleep", "60"])
    try:
        everyone = "os.kill(-1, 9)\n" if backend != "plain" else ""  # only where a kernel boundary stops it
        code = (f"import os, signal\nfor pid in ({canary.pid}, {os.getpid()}, os.getppid()):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                f"{everyone}os.kill({canary.pid}, signal.SIGKILL)\nprint(3)")
        assert score(code, ADD, backend, guard) == 0.0
        time.sleep(0.1)
        assert canary.poll() is None, "the sandboxed program killed a host process"
    finally:
        canary.kill()
        canary.wait()


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_print_gigabytes(backend, guard):
    code = "import sys\nline = '3\\n' * 500_000\nwhile True:\n    sys.stdout.write(line)"
    t0 = time.monotonic()
    r = run_tests(code, [{"stdin": ""}], limits=Limits(**LIMITS), backend=backend, guard=guard)
    assert time.monotonic() - t0 < 8
    assert r.outputs[0] is None or len(r.outputs[0]) <= LIMITS["output_bytes"]
    assert score(code, ADD, backend, guard) == 0.0


@pytest.mark.parametrize("backend,guard", COMBOS, ids=IDS)
def test_exit_before_tests_and_claims(backend, guard):
    call = [{"fn_name": "add", "args": [1, 2], "output": 3}]
    assert score("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", call, backend, guard) == 0.0
    assert score("import os\nos._exit(0)\ndef add(a, b):\n    return a + b", call, backend, guard) == 0.0
    assert score("print('All tests passed')\nimport sys\nsys.exit(0)", ADD, backend, guard) == 0.0
    # a result object that claims equality to everything is compared after a JSON round trip, outside
    liar = "class Eq:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return Eq()"
    assert score(liar, call, backend, guard) == 0.0


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("R1KIT_TEST_SECRET_TOKEN", "hunter2")
    r = run_tests("import os\nprint(sorted(os.environ))", [{"stdin": ""}])
    assert "R1KIT_TEST_SECRET_TOKEN" not in r.outputs[0] and "hunter2" not in r.outputs[0]


def test_output_comparison_is_strict():
    assert output_matches("3\n", {"stdin": "", "expected": "3"})
    assert output_matches("0.3333333\n", {"stdin": "", "expected": "0.33333333"})
    assert not output_matches("3 4", {"stdin": "", "expected": "3"})
    assert not output_matches(None, {"stdin": "", "expected": "3"})


def test_pool_runs_512_programs_within_core_count(monkeypatch):
    import rewards.sandbox as sb

    active, peak, lock, real = [0], [0], threading.Lock(), sb.run_tests

    def counting(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(sb, "run_tests", counting)
    codes = [f"print(int(input()) + {i})" for i in range(512)]
    tests = [[{"stdin": "1\n"}] for _ in range(512)]
    t0 = time.monotonic()
    res = run_many(codes, tests)
    wall = time.monotonic() - t0
    assert [r.outputs[0].strip() for r in res] == [str(1 + i) for i in range(512)]
    assert 2 <= peak[0] <= (os.cpu_count() or 2)
    serial = sum(r.wall_s for r in res)
    print(f"512 programs: wall {wall:.1f}s, serial sum {serial:.1f}s, peak concurrency {peak[0]}")
    assert wall < serial  # they did overlap


def test_fresh_directory_each_run():
    run_tests("open('left_behind.txt', 'w').write('x')\nprint(1)", [{"stdin": ""}])
    r = run_tests("import os\nprint(sorted(os.listdir('.')))", [{"stdin": ""}])
    assert "left_behind.txt" not in r.outputs[0] and "main.py" in r.outputs[0]


def test_cpu_time_and_open_file_limits():
    lim = Limits(cpu_s=1, wall_s=30.0, test_timeout_s=25.0, open_files=16)
    t0 = time.monotonic()
    r = run_tests("x = 0\nwhile True:\n    x += 1", [{"stdin": ""}], limits=lim)
    assert r.outputs[0] == "" and not r.timed_out  # ended by RLIMIT_CPU, long before the 25 s timer
    assert time.monotonic() - t0 < 20
    code = ("fs = []\ntry:\n    for i in range(100):\n        fs.append(open(f'f{i}', 'w'))\n"
            "except OSError:\n    pass\nprint(len(fs))")
    opened = int(run_tests(code, [{"stdin": ""}], limits=lim).outputs[0])
    assert 0 < opened < 16


START_FAILS = r"""
import json, os, resource, sys, tempfile
import rewards.sandbox as sb
backend = sys.argv[1]
sb.available_backends()  # probed (by starting processes) before the limit
seen = {"groups": [], "tops": [], "uids": []}
real_cgroups, real_mkdtemp, real_take = sb._cgroups, tempfile.mkdtemp, sb._take_uid
def cgroups(*a):  # spies: the real functions run, their results are recorded
    made = real_cgroups(*a)
    seen["groups"].append([str(d) for d in made if d.is_dir()])
    return made
def mkdtemp(*a, **k):
    seen["tops"].append(real_mkdtemp(*a, **k))
    return seen["tops"][-1]
def take_uid():
    seen["uids"].append(real_take())
    return seen["uids"][-1]
sb._cgroups, sb._take_uid, tempfile.mkdtemp = cgroups, take_uid, mkdtemp
fd = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor
os.close(fd)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# Room for the one file at a time that the directory, the cgroups and their limits need, not for the three
# (os.devnull and a pipe) that Popen needs at once: the program cannot start, after everything was acquired.
resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 2, hard))
try:
    sb.run_tests("print(1)", [{"stdin": ""}], backend=backend)
    error = None
except OSError as e:
    error = e.errno
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
pool = sorted(sb._SLOTS) if sb._SLOTS is not None else None
after = sb.run_tests("print(1)", [{"stdin": ""}], backend=backend).outputs
print(json.dumps({"errno": error, "pool": pool, "after": after, **seen,
                  "left": [p for p in seen["tops"] + [d for ds in seen["groups"] for d in ds] if os.path.exists(p)]}))
"""


@pytest.mark.parametrize("backend", available_backends())
def test_start_failure_releases_cgroups_uid_and_directory(backend):
    """Popen failing for real (EMFILE under a lowered RLIMIT_NOFILE, in a child process) after the run took its
    directory, cgroups and uid: all of them are given back, and the next run works."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", START_FAILS, backend], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["errno"] == errno.EMFILE, "the program was expected not to start"
    assert len(got["tops"]) == 2  # the failed run's directory and the next run's
    cgroups_here = os.geteuid() == 0 and os.access("/sys/fs/cgroup/pids", os.W_OK)
    if cgroups_here:  # the limit let the failed run make its cgroups, so their removal is what is tested
        assert got["groups"][0], got["groups"]
    assert got["left"] == [], f"left behind: {got['left']}"
    if backend == "chroot":
        assert len(got["uids"]) == 2
        assert got["pool"] == list(range(got["pool"][0], got["pool"][0] + 256)), "a uid was not given back"
    assert got["after"] == ["1\n"]
