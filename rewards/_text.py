"""Shared text helpers for rewards: completion text, the answer region after </think>, answer extraction and
hedge detection. Pure string work (no sympy), so it is safe and fast in the trainer process."""

from __future__ import annotations

import re
import unicodedata


def completion_text(c) -> str:
    """TRL passes plain strings for standard datasets and [{"role", "content"}] lists for conversational ones."""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(m.get("content", "") or "" if isinstance(m, dict) else str(m) for m in c)
    if isinstance(c, dict):
        return str(c.get("content", ""))
    return "" if c is None else str(c)


def prompt_text(p) -> str:
    """A prompt as text: plain string, or the user turns of a chat-message list."""
    if isinstance(p, list):
        users = [m.get("content", "") or "" for m in p if isinstance(m, dict) and m.get("role") == "user"]
        return "\n".join(users) if users else completion_text(p)
    return completion_text(p)


def split_think(text: str, think_in_prompt: bool = False) -> tuple[str, str]:
    """(chain of thought, answer region). The answer region is everything after the last </think>; an unclosed
    <think> (or think_in_prompt without </think>) means it is all thought. No tags at all: no thought."""
    if "</think>" in text:
        head, _, tail = text.rpartition("</think>")
        return head.replace("<think>", " "), tail
    if "<think>" in text or think_in_prompt:
        return text.replace("<think>", " "), ""
    return "", text


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every \boxed{...} / \fbox{...} in order, with balanced braces."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        i, depth = m.end(), 1
        for j in range(i, len(text)):
            ch = text[j]
            depth += 1 if ch == "{" else -1 if ch == "}" else 0
            if depth == 0:
                out.append(text[i:j].strip())
                break
    return out


def extract_answer(text: str, pattern: str | None = None, think_in_prompt: bool = False,
                   join_boxes: bool = False) -> tuple[str | None, str]:
    r"""(answer, why). The single <answer> block's content, else the last \boxed{} after </think>, else the last
    match of `pattern` (first group). Text inside <think> never counts (our own extraction: math-verify's
    searches the whole text, <think> included). why is "ok", "no_answer" or "hedge"
    (several answer blocks, or several different boxed answers). With `join_boxes`, several different boxed
    answers come back joined by ", " with why "boxes" instead: the caller decides whether that list is a hedge."""
    _, tail = split_think(text, think_in_prompt)
    blocks = _ANSWER.findall(tail)
    if len(blocks) > 1:
        return None, "hedge"
    region = blocks[0] if blocks else tail
    boxed = boxed_contents(region)
    if len(set(boxed)) > 1:
        return (", ".join(dict.fromkeys(boxed)), "boxes") if join_boxes else (None, "hedge")
    if boxed:
        return boxed[-1], "ok"
    if blocks:
        return blocks[0].strip(), "ok"
    if pattern:
        found = list(re.finditer(pattern, tail, re.S))
        if found:
            m = found[-1]
            return (m.group(1) if m.groups() else m.group(0)).strip(), "ok"
    return None, "no_answer"


# ---- hedge detection (an answer that names several candidates when one is asked for) ----
# Our own because math-verify picks one match from the text ("7 or 5" extracts 5 in some configurations) and
# has no notion of a hedge; these checks are plain string work, done before anything is parsed.

_OR_WORDS = re.compile(r"(?i)(?<![a-z])(or|either)(?![a-z])|\\lor|\\vee|\\pm|\\mp|±|∓|或")
_AND_WORDS = re.compile(r"(?i)(?<![a-z])and(?![a-z])")
# alternatives between two values inside a sentence ("... is 5 or 7", "$x=1$ or $x=2$", "could be 5 or it could
# be 7"): a value (digit or $) before the "or" and another after it; in prose an "or" without values on both
# sides is ordinary language ("two or more steps")
_SENTENCE_OR = re.compile(r"(?i)\b(?:or|either)\b|\\lor|\\vee|或")


def _value_or(sentence: str) -> bool:
    """Is there an "or" with a value (a digit or $) somewhere before it and another after it? Linear time: this
    runs in the trainer, on answers of any length."""
    values = [m.start() for m in re.finditer(r"[\d$]", sentence)]
    return bool(values) and any(values[0] < m.start() and m.end() <= values[-1]
                                for m in _SENTENCE_OR.finditer(sentence))
_MULTI_GOLD = re.compile(r",|;|\\\{|\\cup|\\pm|\\begin\{|\\cap|\bor\b|\band\b|\\lor|\[|\]|\(.*,.*\)|\\boxed.*\\boxed")
_CONNECTIVES = {"and", "or", "either"}
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "pi", "inf", "infty", "mod", "max",
               "min", "gcd", "lcm", "det", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "frac", "cdot"}


def _top_level(s: str, seps: str) -> bool:
    """Does `s` contain one of `seps` outside any brackets?"""
    depth = 0
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and ch in seps:
            return True
    return False


def is_sentence(s: str) -> bool:
    """Does the answer contain words (beyond units of one word, LaTeX commands, and/or), i.e. is it a sentence
    such as "The largest $n$ is 34." rather than a bare expression?"""
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox|begin|end)\{[^{}]*\}|\\[A-Za-z]+", " ", s)
    s = re.sub(r"(?i)^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?", " ", s)
    words = [w.lower() for w in re.findall(r"[A-Za-z]{3,}", s)]
    return len([w for w in words if w not in _MATH_WORDS and w not in _CONNECTIVES]) >= 2


def gold_is_single(gold: str) -> bool:
    """A gold answer naming one value (not a set, list, tuple, interval, matrix, ± pair, "a and b", or several
    boxed answers)."""
    return not _MULTI_GOLD.search(strip_thousands(gold))


# a thousands group: 1-3 leading digits (not starting with 0: 0,111 is a decimal), then groups of exactly three
# after ",", "{,}", "\," or MATH's ",\!"
_THOUSANDS = re.compile(r"(?<![\d.])([1-9]\d{0,2})((?:(?:\{,\}|\\,|,\\!\s*|,)\d{3})+)(?!\d)")


def strip_thousands(s: str) -> str:
    """1,000,000 and 1{,}000 and 1\\,000 and 11,\\!000 -> 1000000 (only digit groups of exactly three)."""
    if not re.search(r"[()\[\]]|\\\{", s):  # 1,000 is a thousand; (1,000] and \{1,000\} are not
        s = _THOUSANDS.sub(lambda m: m.group(1) + re.sub(r"\D", "", m.group(2)), s)
    return re.sub(r"(?<!\\)\\[,;:! ]", " ", s)  # LaTeX spacing is not a list separator (a \\ row end stays)


def is_hedge(pred: str, gold: str) -> bool:
    """True when the gold names a single value but the prediction lists or alternates several candidates:
    "5 or 7", "5, 7", "5 and 7", "\\pm 3", "x = 2; x = 3". In a sentence only "or" between two values counts
    here: its commas are mostly punctuation ("Therefore, the answer is 5")."""
    if not gold_is_single(gold):
        return False
    p = re.sub(r"\\(?:text|mathrm|textbf)\{\s*(or|either|and)\s*\}", r" \1 ", strip_thousands(pred))
    p = re.sub(r"(?<![\d,.])(\d+),(\d+)(?![\d,])", r"\1.\2", p)  # 2,74 is a decimal comma, not a list of two
    bare = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", " ", p)  # other \text{} is units or prose
    if is_sentence(pred):  # a worked solution says "x = 1 or x = 2" on the way: only its last sentence counts
        last = [x for x in re.split(r"(?<=[.!?。])\s+", bare) if re.search(r"[\d$\\]", x)]
        return bool(last) and _value_or(last[-1])  # (a stated list is caught once parsed: _mathworker)
    if _OR_WORDS.search(bare) or _AND_WORDS.search(bare):
        return True
    return _top_level(p, ",;")


def normalise_string(s: str) -> str:
    """Exact-string mode: unicode-folded, case-folded, \\text{} unwrapped, outer $ and punctuation dropped,
    whitespace collapsed."""
    s = unicodedata.normalize("NFKC", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.strip().strip("$").strip()
    s = re.sub(r"\s+", " ", s).casefold()
    return s.strip(" .。!?,;:'\"`")
