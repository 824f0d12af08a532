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


def extract_answer(text: str, pattern: str | None = None, think_in_prompt: bool = False) -> tuple[str | None, str]:
    r"""(answer, why). The single <answer> block's content, else the last \boxed{} after </think>, else the last
    match of `pattern` (first group). Text inside <think> never counts (our own extraction: math-verify's
    searches the whole text, <think> included). why is "ok", "no_answer" or "hedge"
    (several answer blocks, or several different boxed answers)."""
    _, tail = split_think(text, think_in_prompt)
    blocks = _ANSWER.findall(tail)
    if len(blocks) > 1:
        return None, "hedge"
    region = blocks[0] if blocks else tail
    boxed = boxed_contents(region)
    if len(set(boxed)) > 1:
        return None, "hedge"
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
_MULTI_GOLD = re.compile(r",|;|\\\{|\\cup|\\pm|\\begin\{|\\cap|\bor\b|\\lor|\[|\]|\(.*,.*\)")


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


def gold_is_single(gold: str) -> bool:
    """A gold answer naming one value (not a set, list, tuple, interval, matrix or ± pair)."""
    return not _MULTI_GOLD.search(strip_thousands(gold))


def strip_thousands(s: str) -> str:
    """1,000,000 and 1{,}000 and 1\\,000 -> 1000000 (only digit groups of exactly three)."""
    if not re.search(r"[()\[\]]|\\\{", s):  # 1,000 is a thousand; (1,000] and \{1,000\} are not
        s = re.sub(r"(?<=\d)(?:\{,\}|\\,|,)(?=\d{3}(?!\d))", "", s)
    return re.sub(r"\\[,;:! ]", " ", s)  # LaTeX spacing is not a list separator


def is_hedge(pred: str, gold: str) -> bool:
    """True when the gold names a single value but the prediction lists or alternates several candidates:
    "5 or 7", "5, 7", "\\pm 3", "x = 2; x = 3"."""
    if not gold_is_single(gold):
        return False
    p = re.sub(r"\\(?:text|mathrm|textbf)\{\s*(or|either)\s*\}", r" \1 ", strip_thousands(pred))
    if _OR_WORDS.search(re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", " ", p)):  # other \text{} is units or prose
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
