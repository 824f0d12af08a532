"""Verification worker: a separate process that parses and compares answers with math-verify and sympy.

Run by rewards._pool as `python _mathworker.py FD` once per trainer process: this first process is a zygote that
imports and warms up sympy, then forks a ready worker (~10 ms) for every socket the pool sends it over FD, so a
worker killed for its deadline is replaced at once. Workers speak JSON lines on their socket. All sympy work, including
str() of parsed objects (which can hang for tens of seconds), happens here and never in the trainer. A soft
timer (SIGALRM, fine here: this is the worker's main thread) ends Python-level hangs; the pool SIGKILLs the
worker for hangs inside C code (huge integer powers), and RLIMIT_AS turns memory blow-ups into MemoryError.
Self-contained on purpose: it imports nothing from r1kit, so it starts in ~0.6 s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys


class _Timeout(BaseException):
    """Raised by the soft timer; BaseException so sympy's broad `except Exception` cannot swallow it."""


def _alarm(signum, frame):
    raise _Timeout()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the parent goes (Linux; elsewhere a closed socket still ends the loop)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(0)
    except Exception:
        pass


def _setup() -> None:
    """Die with the trainer, cap memory, quiet logs."""
    _die_with_parent()
    mem = int(os.environ.get("R1KIT_VERIFY_MEMORY_MB", "3072")) * 2**20
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    except (ImportError, ValueError, OSError):
        pass
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which then closes our stdin
    logging.disable(logging.CRITICAL)


_setup()

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # noqa: E402
from math_verify.parser import NormalizationConfig  # noqa: E402
import sympy  # noqa: E402

def _two_stage_antlr() -> None:
    """Parse LaTeX with ANTLR's SLL prediction first and fall back to full LL only when SLL reports an error
    (ANTLR's documented two-stage strategy). latex2sympy always uses LL, whose full-context predictions cost
    ~0.2 s per new tuple or interval; same trees wherever SLL succeeds (checked on the labelled set)."""
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended import latex2sympy2 as l2s

    make, parse_ll = l2s._Latex2Sympy.create_parser, l2s._Latex2Sympy.parse

    def create_parser(self, latex_str):
        parser = make(self, latex_str)
        if getattr(self, "_r1kit_sll", False):
            parser._interp.predictionMode = PredictionMode.SLL
        return parser

    def parse(self, latex_str):
        self._r1kit_sll = True
        try:
            return parse_ll(self, latex_str)
        except Exception:
            pass
        finally:
            self._r1kit_sll = False
        return parse_ll(self, latex_str)

    l2s._Latex2Sympy.create_parser, l2s._Latex2Sympy.parse = create_parser, parse


if os.environ.get("R1KIT_ANTLR_LL_ONLY") != "1":
    _two_stage_antlr()
_LATEX = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0)]
_ANY = _LATEX + [ExprExtractionConfig()]
_MULTI = (sympy.FiniteSet, sympy.Tuple, sympy.Interval, sympy.Union, sympy.MatrixBase, list, tuple, set)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# plain-word units after a number ("12 dollars", "3 km/h") that math-verify's \text{} unit handling misses
_UNIT_WORDS = re.compile(rf"^\s*(\\?\$?\s*{_NUMBER})\s*(?:[a-zA-Z]{{2,}}(?:/[a-zA-Z]+)?\.?\s*)+$")
_NOT_UNITS = {"pi", "sqrt", "frac", "cdot", "times", "mod", "ln", "log", "sin", "cos", "tan", "exp", "dfrac", "oo"}


def _clean(s: str) -> str:
    """Textual clean-up before parsing, for forms math-verify 0.9 gets wrong (each one is in the labelled set):
    answer lead-ins, trailing full stops, 1{,}000 and 1\,000, LaTeX spacing, 1.5e3, word units."""
    s = s.strip()
    s = re.sub(r"(?i)^(?:\\text\{)?\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:=]?\s*\}?", "", s).strip()
    if not re.search(r"[()\[\]]|\\\{", s):  # 1,000 is a thousand; (1,000] and \{1,000\} are not
        s = re.sub(r"(?<=\d)(?:\{,\}|\\,|,)(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"[.。]+\s*$", "", s).strip()
    s = re.sub(r"\\[,;:! ]|~", " ", s)  # LaTeX spacing
    s = re.sub(r"^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$", r"\1\\times 10^{\2}", s)  # 1.5e3
    m = _UNIT_WORDS.match(s)
    if m and not (set(re.findall(r"[a-zA-Z]+", s[m.end(1):])) & _NOT_UNITS):
        s = m.group(1)
    return s


_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "pi", "inf", "infty", "mod", "max",
               "min", "gcd", "lcm", "det", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "frac", "cdot"}


def is_prose(gold: str) -> bool:
    """A gold answer written in words ("see solution", "yes") is not a mathematical answer."""
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox|begin|end)\{[^{}]*\}|\\[A-Za-z]+", " ", _clean(gold))
    return any(w.lower() not in _MATH_WORDS for w in re.findall(r"[A-Za-z]{3,}", s))


def _parse(s: str, cache: dict | None = None):
    """math-verify parse of a bare answer: first as the content of a \\boxed{} (keeps the whole expression), then
    as free text."""
    if cache is not None and s in cache:
        return cache[s]
    c = _clean(s)
    out = parse("\\boxed{" + c + "}", extraction_config=_LATEX, parsing_timeout=None) or parse(
        c, extraction_config=_ANY, parsing_timeout=None)
    if cache is not None:
        if len(cache) > 4096:
            cache.clear()
        cache[s] = out
    return out


def _is_multi(parsed) -> bool:
    return bool(parsed) and isinstance(parsed[0], _MULTI) and not (
        isinstance(parsed[0], sympy.FiniteSet) and len(parsed[0]) <= 1)


def _number(parsed) -> float | None:
    """The float value of a parsed answer, or None if it is not a single finite number."""
    if not parsed:
        return None
    x = parsed[0]
    if isinstance(x, sympy.Eq):
        x = x.rhs
    try:
        v = complex(sympy.N(x, 30))
    except (TypeError, ValueError, AttributeError):
        return None
    return v.real if abs(v.imag) < 1e-12 and math.isfinite(v.real) else None


_GOLD_CACHE: dict = {}


def check(req: dict) -> dict:
    """One verification: {mode, gold, pred, rel_tol, abs_tol, explain} -> {score, why, gold_repr, pred_repr}."""
    mode, gold, pred = req.get("mode", "math"), req["gold"], req["pred"]
    g = None if is_prose(gold) else _parse(gold, _GOLD_CACHE)
    if not g or isinstance(g[0], str):  # math-verify fell back to raw text: not a mathematical answer
        return {"score": None, "why": "gold_unparsed"}
    p = _parse(pred)
    out: dict = {}
    if req.get("explain"):
        out = {"gold_repr": str(g[0])[:200], "pred_repr": str(p[0])[:200] if p else "[unparsed]"}
    if not p:
        return {"score": 0.0, "why": "pred_unparsed", **out}
    if _is_multi(p) and not _is_multi(g):
        return {"score": 0.0, "why": "hedge", **out}
    if mode == "numeric":
        gv, pv = _number(g), _number(p)
        if gv is None:
            return {"score": None, "why": "gold_unparsed", **out}
        ok = pv is not None and math.isclose(pv, gv, rel_tol=req.get("rel_tol", 1e-4), abs_tol=req.get("abs_tol", 1e-8))
    else:
        ok = verify(g, p, timeout_seconds=None)
    return {"score": 1.0 if ok else 0.0, "why": "ok" if ok else "wrong", **out}


_WARMUP = [  # one of each common answer shape: ANTLR's prediction cache and sympy's lazy imports warm up here, once
    ("(x+1)^2", "x^2+2x+1"), ("\\frac{1}{2}", "0.5"), ("(1,2]", "\\left(1, 2\\right]"), ("\\{1,2\\}", "1,2"),
    ("(44, 14)", "(44,14)"), ("\\sqrt{8}", "2\\sqrt{2}"), ("54\\sqrt{2}", "\\sqrt{5832}"), ("x=2", "2"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
    ("\\frac{72\\pi}{3}", "72\\pi/3"), ("\\pi", "\\frac{\\pi}{1}"), ("50\\%", "0.5"), ("51\\%", "51\\%"),
    ("1000", "1{,}000"), ("12", "12 \\text{ cm}"), ("12", "\\$12"), ("3.5", "\\dfrac{7}{2}"), ("-3", "-3.0"),
    ("(-\\infty, 3)", "(-\\infty,3)"), ("[0,1]\\cup[2,3]", "[0,1] \\cup [2,3]"), ("y=2x+1", "2x+1"),
    ("\\sin(\\pi/3)", "\\frac{\\sqrt{3}}{2}"), ("2^{10}", "1024"), ("\\sqrt[3]{27}", "3"),
]


def serve(sock) -> None:
    """Worker loop: one request line in, one result line (same id) out, until the socket closes."""
    rf, wf = sock.makefile("rb"), sock.makefile("wb")
    wf.write(b'{"ready": true}\n')
    wf.flush()
    for line in rf:
        req = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, req.get("soft_s", 0.8))
        try:
            res = check(req)
        except (_Timeout, MemoryError):
            res = {"score": 0.0, "why": "timeout"}
        except Exception as e:  # a parser bug on odd input is a wrong answer, reported as an error
            res = {"score": 0.0, "why": "error", "error": repr(e)[:200]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        res["id"] = req["id"]
        wf.write((json.dumps(res) + "\n").encode())
        wf.flush()


def main() -> None:
    """Zygote: warm up, then fork one worker per socket received on the control socket; reply with its pid."""
    import socket

    os.dup2(2, 1)  # a stray print() inside a library must not reach anything that parses
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    for gold, pred in _WARMUP:  # sympy imports and caches lazily: pay that once, before any deadline
        try:
            check({"gold": gold, "pred": pred})
        except Exception:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel; the pool kills by pid
    ctrl.sendall(b"ready\n")
    while True:
        msg, fds, _, _ = socket.recv_fds(ctrl, 16, 1)
        if not msg:
            os._exit(0)  # the trainer is gone
        pid = os.fork()
        if pid == 0:
            ctrl.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _die_with_parent()
            try:
                serve(socket.socket(fileno=fds[0]))
            finally:
                os._exit(0)
        os.close(fds[0])
        ctrl.sendall(f"{pid}\n".encode())


if __name__ == "__main__":
    main()
