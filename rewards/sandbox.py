"""Local code sandbox: run an untrusted Python program against test inputs and return its outputs.

Written here rather than taken from a library because isolation is the product and must be tested as such.
Layers, strongest available first (see the README, "code and the sandbox", for exactly what holds on each):
  bwrap   bubblewrap present: new user/pid/net/ipc/uts/mount namespaces; only /usr, /lib*, /bin, the Python
          prefix (read-only) and the run's directory (read-write) exist; all capabilities dropped.
  chroot  root without bubblewrap: `unshare` pid/net/ipc/uts/mount namespaces and a private tmpfs root holding
          the same read-only binds (r1kit's own small bwrap), then a throwaway uid per slot (no host files
          beyond world-readable ones, RLIMIT_NPROC applies, no signal reaches the trainer).
  plain   neither: a new session and the resource limits only; host isolation is Python-level (the guard).
Always: a fresh temporary directory; scrubbed environment; `python -I -S`; RLIMIT_CPU/AS/NOFILE/FSIZE/CORE
(+NPROC); pids and memory cgroups (v1) when writable; wall-clock kill of the whole tree; outputs read by the
grader from files with a byte cap. The guard (an audit hook: no sockets, no process creation, no signals to
others, no ctypes, no file access outside the directory) is on by default on top of every backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_BOOT = Path(__file__).with_name("_boot.py").read_text()
_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
_PREFIX = os.path.realpath(sys.base_prefix)
_RO_BINDS = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]


@dataclass
class Limits:
    """Per-program resource limits (the whole test run of one program shares them, except test_timeout_s)."""

    cpu_s: int = 10  # RLIMIT_CPU of every process (SIGKILL at the hard limit)
    wall_s: float = 20.0  # whole run, all tests
    test_timeout_s: float = 4.0  # one test
    memory_mb: int = 512  # RLIMIT_AS per process and the memory cgroup's limit
    nproc: int = 32  # pids cgroup / RLIMIT_NPROC of the slot uid
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # RLIMIT_FSIZE: no file, stdout included, grows past this


@dataclass
class RunResult:
    outputs: list[str | None]  # per test: what it wrote to stdout (None: no output file, e.g. killed before)
    backend: str
    wall_s: float
    timed_out: bool = False
    errors: list[str] = field(default_factory=list)  # per-test stderr tails, for debugging only


def _can_run(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Backends that work on this machine, strongest first (probed once by running `true` in each)."""
    out = []
    if shutil.which("bwrap") and _can_run(_bwrap_argv("/", ["/bin/true"])):
        out.append("bwrap")
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv") and _can_run(
            ["unshare", "--pid", "--net", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "/bin/true"]):
        out.append("chroot")
    out.append("plain")
    return tuple(out)


def _bwrap_argv(work: str, cmd: list[str]) -> list[str]:
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for d in _RO_BINDS + [_PREFIX]:
        argv += ["--ro-bind-try", d, d]
    return argv + ["--bind", work, "/sandbox", "--chdir", "/sandbox", "--proc", "/proc", "--dev", "/dev",
                   "--tmpfs", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME",
                   "/sandbox", "--setenv", "LANG", "C.UTF-8", *cmd]


_CHROOT_SH = r"""
set -e
R="$1"; W="$2"; U="$3"; shift 3
mount -t tmpfs -o size=8m,mode=755 r1kit "$R"
for d in "$@"; do
  [ -e "$d" ] || continue
  mkdir -p "$R$d"; mount --rbind "$d" "$R$d"; mount -o remount,bind,ro,nosuid,nodev "$R$d"
done
mkdir -p "$R/sandbox" "$R/proc" "$R/dev" "$R/tmp"; chmod 1777 "$R/tmp"
mount --bind "$W" "$R/sandbox"; mount -t proc proc "$R/proc"
for n in null zero urandom random; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
cd /
exec chroot "$R" setpriv --reuid "$U" --regid "$U" --clear-groups --no-new-privs \
  /usr/bin/env -i PATH=/usr/bin:/bin HOME=/sandbox LANG=C.UTF-8 \
  /bin/sh -c 'cd /sandbox && exec "$0" -I -S boot.py' "$PY"
"""


def _chroot_argv(root: str, work: str, uid: int) -> list[str]:
    return ["unshare", "--pid", "--net", "--ipc", "--uts", "--mount", "--propagation", "private", "--fork",
            "--kill-child", "/bin/sh", "-c", _CHROOT_SH, "sh", root, work, str(uid), *_RO_BINDS, _PREFIX]


def _cgroups(name: str, lim: Limits, stack: contextlib.ExitStack) -> list[Path]:
    """Create per-run pids and memory cgroups (v1) where this process may; [] elsewhere. Each group's removal is
    put on `stack` as soon as its directory exists, so that no path out of the run leaves it behind."""
    made = []
    try:
        mem_rel = next((line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup")
                        if line.split(":")[1] == "memory"), "/")
    except (OSError, IndexError):
        mem_rel = "/"
    for ctrl, rel, files in (("pids", "/", {"pids.max": lim.nproc}),
                             ("memory", mem_rel, {"memory.limit_in_bytes": lim.memory_mb * 2**20 * 2})):
        base = Path("/sys/fs/cgroup", ctrl, rel.lstrip("/"))
        if not (base / "cgroup.procs").exists():
            continue
        d = base / f"r1kit-sandbox-{name}"
        try:
            d.mkdir()
        except OSError:
            continue
        stack.callback(_rm_cgroup, d)
        try:
            for f, v in files.items():
                (d / f).write_text(str(v))
        except OSError:
            continue  # a group without its limit is not joined; the stack still removes it
        made.append(d)
    return made


def _kill_cgroup(d: Path) -> None:
    for _ in range(200):
        try:
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def _rm_cgroup(d: Path) -> None:
    _kill_cgroup(d)
    for _ in range(500):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the kernel has let go of the killed processes
            time.sleep(0.002)


def _preexec(lim: Limits, cgroups: list[Path], work: str, uid: int | None):
    """Runs in the child between fork and exec: join cgroups, set rlimits (inherited by everything it starts)."""
    procs = [str(d / "cgroup.procs") for d in cgroups]

    def fn():
        for p in procs:
            with open(p, "w") as f:
                f.write(str(os.getpid()))
        mem = lim.memory_mb * 2**20
        for res, val in ((resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1)), (resource.RLIMIT_AS, (mem, mem)),
                         (resource.RLIMIT_NOFILE, (lim.open_files, lim.open_files)),
                         (resource.RLIMIT_FSIZE, (lim.output_bytes, lim.output_bytes)),
                         (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NPROC, (lim.nproc, lim.nproc))):
            if res == resource.RLIMIT_NPROC and uid is None and os.geteuid() != 0:
                continue  # would count every process of the user's own uid
            resource.setrlimit(res, val)

    return fn


_SLOTS: "list[int] | None" = None
_SLOT_LOCK = threading.Lock()


def _take_uid() -> int:
    """A throwaway uid for one run (chroot backend): distinct per concurrent run in this process."""
    global _SLOTS
    with _SLOT_LOCK:
        if _SLOTS is None:
            base = 200_000 + (os.getpid() % 20_000) * 256
            _SLOTS = list(range(base, base + 256))
        return _SLOTS.pop()


def _give_uid(uid: int) -> None:
    with _SLOT_LOCK:
        _SLOTS.append(uid)  # type: ignore[union-attr]


def _read_capped(path: Path, cap: int) -> str | None:
    """Read a file the program may have tampered with: no symlinks, regular files only, at most `cap` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, cap + 1)[:cap].decode("utf-8", "replace")
    finally:
        os.close(fd)


def run_tests(code: str, tests: list[dict], *, limits: Limits | None = None, backend: str = "auto",
              guard: bool = True) -> RunResult:
    """Run `code` once per test. A test is {"stdin": str} or {"fn": name, "args": [...]}; its output is the
    program's stdout, or the JSON of fn's return value."""
    lim = limits or Limits()
    backend = available_backends()[0] if backend == "auto" else backend
    if backend not in available_backends():
        raise RuntimeError(f"sandbox backend {backend!r} is not available here; have {available_backends()}")
    name = uuid.uuid4().hex[:12]
    # Every acquisition is followed at once by its release on a stack, so a failure anywhere (Popen raising
    # EMFILE or ENOMEM, the chroot setup failing) gives back the directory, the uid and the cgroups. `keep`
    # (directory, uid) outlives `live` (cgroups, the process tree): outputs are read once nothing of the
    # program can still run, and the uid goes back to the pool only after that.
    with contextlib.ExitStack() as keep:
        top = Path(tempfile.mkdtemp(prefix="r1kit-sbx-"))
        keep.callback(_remove_tree, top)
        work, root = top / "w", top / "root"
        work.mkdir()
        (work / "main.py").write_text(code)
        (work / "boot.py").write_text(_BOOT)
        (work / "tests.json").write_text(json.dumps({
            "tests": [{"fn": t.get("fn"), "args": t.get("args", [])} for t in tests],
            "test_timeout_s": lim.test_timeout_s, "guard": guard}))
        for k, t in enumerate(tests):
            (work / f"in_{k}").write_text(t.get("stdin", "") or "")
        uid = None
        if backend == "chroot":
            uid = _take_uid()
            keep.callback(_give_uid, uid)
            root.mkdir()
            os.chown(work, uid, uid)
            work.chmod(0o700)
        else:
            work.chmod(0o777 if os.geteuid() == 0 else 0o700)
        if backend == "bwrap":
            argv = _bwrap_argv(str(work), [_PYTHON, "-I", "-S", "boot.py"])
        elif backend == "chroot":
            argv = _chroot_argv(str(root), str(work), uid)  # type: ignore[arg-type]
        else:
            argv = [_PYTHON, "-I", "-S", "boot.py"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(work)}
        if backend == "chroot":
            env["PY"] = _PYTHON  # read by the setup script, not passed on to the program
        with contextlib.ExitStack() as live:
            if uid is not None:
                live.callback(_kill_uid, uid)
            cgroups = _cgroups(name, lim, live) if backend != "plain" or os.geteuid() == 0 else []
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                    preexec_fn=_preexec(lim, cgroups, str(work), uid))
            live.callback(_reap, proc)
            timed_out = not _wait(proc, lim.wall_s)
        outputs = [_read_capped(work / f"out_{k}", lim.output_bytes) for k in range(len(tests))]
        errors = [(_read_capped(work / f"err_{k}", 4096) or "")[-500:] for k in range(len(tests))]
    return RunResult(outputs, backend, time.monotonic() - t0, timed_out, errors)


def _remove_tree(top: Path) -> None:
    """Delete the run's directory, also when the process is short of descriptors (EMFILE, which may be what stopped
    the program starting): shutil.rmtree holds one per level, so fall back to a walk that holds one at a time.
    Nothing of the program runs by now, so the tree cannot change underneath."""
    shutil.rmtree(top, ignore_errors=True)
    for d, dirs, files in os.walk(top, topdown=False):  # nothing left to walk when rmtree succeeded
        for n in files + [n for n in dirs if os.path.islink(os.path.join(d, n))]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, n))
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _reap(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole session (it may have left children) and collect its exit status."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()
    proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the process to exit; False on timeout. A pidfd wakes at the exit itself, where Popen.wait(timeout)
    polls with sleeps of up to 50 ms (which dominated short runs)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process left with this throwaway uid (kill(-1) as that uid reaches exactly its own)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() == uid != 0:  # never kill(-1) with any other identity
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def run_many(codes: list[str], tests: list[list[dict]], *, workers: int | None = None, **kw) -> list[RunResult]:
    """Run many programs, at most `workers` (default: the core count) sandboxes at a time."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as ex:
        return list(ex.map(lambda ct: run_tests(ct[0], ct[1], **kw), zip(codes, tests)))
