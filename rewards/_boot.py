"""Harness that runs inside the code sandbox (copied there as boot.py; stdlib only).

Reads tests.json (inputs only; expected outputs never enter the sandbox), and for each test forks a child in
its own process group that redirects stdin from in_K, stdout to out_K and stderr to err_K, optionally installs
the Python-level guard (an audit hook that cannot be removed), then runs the program: as __main__ for stdin
tests, or imported and `fn(*args)` called for call-based tests, whose JSON result goes to out_K. The grader
outside the sandbox reads out_K; nothing this process or the program says about passing is trusted.
"""

import json
import os
import signal
import sys
import time

CFG = json.load(open("tests.json"))
ROOT = os.path.realpath(os.getcwd())


def guard() -> None:
    """Deny network, signals to other processes, process creation, native code loading, and file access
    outside the sandbox directory and the interpreter's own files. Python-level only: defence in depth."""
    me = os.getpid()
    read_ok = tuple({os.path.realpath(p) for p in (ROOT, sys.prefix, sys.base_prefix, sys.exec_prefix)})
    denied = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "ctypes.dlopen",
              "ctypes.dlsym", "ctypes.cdata", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.forkpty", "subprocess.Popen", "signal.pthread_kill", "os.putenv", "os.chdir", "os.chroot"}

    def hook(event, args):
        if event in denied:
            raise PermissionError(f"{event} is not allowed in the r1kit sandbox")
        if event in ("os.kill", "os.killpg") and args[0] not in (me, 0):
            raise PermissionError("signalling other processes is not allowed in the r1kit sandbox")
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = os.path.realpath(os.fsdecode(args[0]))
            writing = (args[1] or "r").strip("b") not in ("r", "rt") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)
            ok = path.startswith(ROOT + os.sep) if writing else (
                path in ("/dev/null", "/dev/urandom") or path.startswith(tuple(p + os.sep for p in read_ok)))
            if not ok:
                raise PermissionError(f"opening {path} is not allowed in the r1kit sandbox")

    sys.addaudithook(hook)


def child(k: int, test: dict) -> None:
    """Run one test in this forked process; never returns."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, CFG["test_timeout_s"])
    for fd, name, flags in ((0, f"in_{k}", os.O_RDONLY), (1, f"out_{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, f"err_{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(name, flags, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin, sys.stdout, sys.stderr = (open(0, "r", closefd=False), open(1, "w", closefd=False),
                                         open(2, "w", closefd=False))
    src = open("main.py").read()
    if CFG["guard"]:
        guard()
    try:
        code = compile(src, "main.py", "exec")
        if test.get("fn") is None:
            exec(code, {"__name__": "__main__", "__file__": "main.py"})
            sys.stdout.flush()
        else:
            ns = {"__name__": "solution", "__file__": "main.py"}
            exec(code, ns)
            fn = ns.get(test["fn"])
            if fn is None and "Solution" in ns:  # LeetCode style
                fn = getattr(ns["Solution"](), test["fn"])
            result = fn(*test.get("args", []))
            sys.stdout.flush()
            os.ftruncate(1, 0)
            os.lseek(1, 0, 0)
            os.write(1, json.dumps(result).encode())
    except SystemExit as e:  # sys.exit() in a stdin program is a normal end; its code is not trusted anyway
        sys.stdout.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def main() -> None:
    for k, test in enumerate(CFG["tests"]):
        pid = os.fork()
        if pid == 0:
            try:
                child(k, test)
            finally:
                os._exit(1)
        end = time.monotonic() + CFG["test_timeout_s"] + 0.5
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > end:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        try:
            os.killpg(pid, signal.SIGKILL)  # leftovers the test forked
        except OSError:
            pass


if __name__ == "__main__":
    main()
