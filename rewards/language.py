"""`language`: DeepSeek-R1's language-consistency reward, the share of target-language words in the chain of thought.

Choices (deterministic; documented in the README, section "language"):
- The text scored is the chain of thought (inside <think>; the whole completion minus <answer> blocks when
  there are no think tags).
- Removed before counting: code (``` blocks, `inline`), LaTeX ($..$, $$..$$, \\(..\\), \\[..\\], \\commands),
  numbers, punctuation and symbols, and one-letter Latin/Cyrillic/Greek tokens (math variables like x, n).
- Words: a run of letters of one script. Han, Hiragana, Katakana and Hangul count one word per character.
- A word in a script the target language is not written in is not a target word (script detection, exact).
- Scripts shared by several languages (Latin, Cyrillic, Arabic, Devanagari) go to lingua, an offline language
  identifier, one sentence at a time over that sentence's words in the target script: a sentence of 3+ such
  words counts when lingua's top language is the target; a shorter one when the target's confidence is at
  least half the best (short fragments are ambiguous, so they get the benefit of the doubt).
- Target language: kwarg `language`, else column `lang_column` (default "lang"), else detected from the prompt.
  ISO 639-1 codes ("en", "zh") or English names ("chinese").
- No words at all after stripping (a purely symbolic chain of thought): None, "does not apply".
"""

from __future__ import annotations

import functools
import re
import unicodedata

from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

from rewards._text import completion_text, prompt_text, split_think
from rewards.registry import register

_SCRIPT_OF_LANG = {  # ISO 639-1 -> the scripts its words are written in (everything else: LATIN)
    "zh": {"HAN"}, "ja": {"HAN", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL", "HAN"},
    "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "be": {"CYRILLIC"}, "bg": {"CYRILLIC"}, "mk": {"CYRILLIC"},
    "sr": {"CYRILLIC", "LATIN"}, "kk": {"CYRILLIC"}, "mn": {"CYRILLIC"},
    "ar": {"ARABIC"}, "fa": {"ARABIC"}, "ur": {"ARABIC"}, "he": {"HEBREW"}, "el": {"GREEK"},
    "hi": {"DEVANAGARI"}, "mr": {"DEVANAGARI"}, "bn": {"BENGALI"}, "pa": {"GURMUKHI"}, "gu": {"GUJARATI"},
    "ta": {"TAMIL"}, "te": {"TELUGU"}, "th": {"THAI"}, "ka": {"GEORGIAN"}, "hy": {"ARMENIAN"},
}
_PER_CHAR = {"HAN", "HIRAGANA", "KATAKANA", "HANGUL"}
_STRIP = [
    re.compile(r"```.*?(?:```|$)", re.S), re.compile(r"`[^`\n]*`"),
    re.compile(r"\$\$.*?\$\$", re.S), re.compile(r"\$[^$\n]*\$"), re.compile(r"\\\(.*?\\\)", re.S),
    re.compile(r"\\\[.*?\\\]", re.S), re.compile(r"\\[A-Za-z]+\*?(?:\{[^{}]*\})*"),
    re.compile(r"<answer>.*?</answer>", re.S), re.compile(r"</?(?:think|answer)>"),
]


def _script(ch: str) -> str | None:
    """Unicode script of a letter from its character name (HAN for CJK ideographs), None for non-letters."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if name.startswith("CJK"):
        return "HAN"
    if name.startswith("HANGUL"):
        return "HANGUL"
    return name.split(" ", 1)[0] if name else None


def words(text: str) -> list[tuple[str, str, int]]:
    """(word, script, sentence index) after stripping code, LaTeX, numbers and symbols."""
    for pat in _STRIP:
        text = pat.sub(" ", text)
    out, sent, cur, cur_script = [], 0, "", None

    def flush():
        nonlocal cur, cur_script
        if cur and not (len(cur) == 1 and cur_script in ("LATIN", "CYRILLIC", "GREEK")):
            out.append((cur, cur_script, sent))
        cur, cur_script = "", None

    for ch in text:
        s = _script(ch) if ch not in "'’" else cur_script
        if s is None or (cur_script and s != cur_script) or s in _PER_CHAR:
            flush()
        if s in _PER_CHAR:
            out.append((ch, s, sent))
        elif s is not None:
            cur, cur_script = cur + ch, s
        if ch in ".!?。！？\n;；":
            sent += 1
    flush()
    return out


def parse_language(code: str) -> Language:
    """'en' / 'EN' / 'english' -> lingua Language."""
    c = str(code).strip()
    if len(c) == 2:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper()))
    return getattr(Language, c.upper())


@functools.lru_cache(maxsize=None)
def _detector(script: str):
    """A lingua detector over the languages written in `script` (built once; low-accuracy mode keeps it light)."""
    langs = [lang for lang in Language.all() if script in _scripts(lang)]
    return LanguageDetectorBuilder.from_languages(*langs).with_low_accuracy_mode().build() if len(langs) > 1 else None


def _scripts(lang: Language) -> set[str]:
    return _SCRIPT_OF_LANG.get(lang.iso_code_639_1.name.lower(), {"LATIN"})


@functools.lru_cache(maxsize=None)
def _all_detector():
    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def detect(text: str) -> Language | None:
    """The language of a prompt: the dominant script decides unless several languages share it, then lingua."""
    ws = words(text)
    if not ws:
        return None
    counts: dict[str, int] = {}
    for _, s, _ in ws:
        counts[s] = counts.get(s, 0) + 1
    top = max(sorted(counts), key=counts.get)
    if top == "HAN" and counts.get("HIRAGANA", 0) + counts.get("KATAKANA", 0) > 0:
        return Language.JAPANESE
    only = {"HAN": Language.CHINESE, "HANGUL": Language.KOREAN, "HIRAGANA": Language.JAPANESE,
            "KATAKANA": Language.JAPANESE, "GREEK": Language.GREEK, "HEBREW": Language.HEBREW, "THAI": Language.THAI}
    if top in only:
        return only[top]
    det = _detector(top)
    if det is None:
        return _all_detector().detect_language_of(text)
    return det.detect_language_of(" ".join(w for w, s, _ in ws if s == top))


def _chunks(ws: list[tuple[str, str, int]], scripts: set[str], min_words: int = 6) -> list[list[tuple[str, str]]]:
    """Target-script words grouped by sentence, short sentences merged into the next (or last) chunk so lingua
    sees at least `min_words` words where the text has them."""
    chunks: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    last = None
    for w, s, k in ws:
        if s not in scripts:
            continue
        if last is not None and k != last and len(cur) >= min_words:
            chunks.append(cur)
            cur = []
        cur.append((w, s))
        last = k
    if cur:
        if chunks and len(cur) < min_words:
            chunks[-1] += cur
        else:
            chunks.append(cur)
    return chunks


def consistency(text: str, target: Language) -> float | None:
    """Target-language words / all words in `text`; None when there are no words."""
    ws = words(text)
    if not ws:
        return None
    scripts = _scripts(target)
    hits = 0
    for chunk in _chunks(ws, scripts):
        shared = [w for w, s in chunk if s not in _PER_CHAR and _detector(s) is not None]
        hits += len(chunk) - len(shared)  # exact by script
        if shared:
            det = _detector(next(s for w, s in chunk if w in shared))
            conf = {c.language: c.value for c in det.compute_language_confidence_values(" ".join(shared))}
            if conf.get(target, 0.0) >= 0.5 * max(conf.values(), default=0.0):
                hits += len(shared)
    return hits / len(ws)


@register("language")
def language_reward(completions, prompts=None, language: str | None = None, lang_column: str = "lang",
                    think_in_prompt: bool = False, **columns) -> list[float | None]:
    """R1's language-consistency reward per completion, in [0, 1]."""
    col = columns.get(lang_column)
    out = []
    for i, c in enumerate(completions):
        code = language or (col[i] if col is not None else None)
        if code:
            target = parse_language(code)
        else:
            target = detect(prompt_text(prompts[i])) if prompts is not None else None
        if target is None:
            out.append(None)
            continue
        text = completion_text(c)
        cot, tail = split_think(text, think_in_prompt)
        out.append(consistency(cot if (cot.strip() or "</think>" in text) else tail, target))
    return out
