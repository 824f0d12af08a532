"""The labelled set: (completion, gold, expected) cases written for r1kit, scored by the real rewards (real
math-verify in the real worker pool, real lingua). Covers every bullet of accuracy, format and language, plus
the reward-hacking patterns. Must pass at 100%; a failure lists every wrong case."""

from __future__ import annotations

import pytest

import rewards

T = "<think>Let me work through the problem step by step.</think>"


def A(x: str) -> str:
    """R1 layout: reasoning, then the answer block."""
    return f"{T} <answer>{x}</answer>"


def B(x: str) -> str:
    """Boxed layout after the reasoning."""
    return f"{T} So the final answer is \\boxed{{{x}}}."


# (completion, gold, expected, kwargs, note)
ACCURACY = [
    # --- extraction ---
    ("<think> 3 + 4 = 7. 7 * 5 = 35. </think> <answer> 35 </answer>", "35", 1.0, {}, "tiny recipe layout"),
    ("<think> 3 + 4 = 7. 7 * 5 = 35. </think> <answer> 36 </answer>", "35", 0.0, {}, "tiny recipe wrong"),
    (A("35"), "35", 1.0, {}, "answer block"),
    (B("35"), "35", 1.0, {}, "boxed after think"),
    (f"{T} first \\boxed{{35}} and again \\boxed{{35}}", "35", 1.0, {}, "same boxed twice is not a hedge"),
    (A("\\boxed{35}"), "35", 1.0, {}, "boxed inside answer block"),
    ("The answer is \\boxed{35}", "35", 1.0, {}, "no think tags: whole text is the answer region"),
    ("<think>the answer is \\boxed{35}</think> I am not sure.", "35", 0.0, {}, "boxed only inside think"),
    ("<think><answer>35</answer></think> <answer>34</answer>", "35", 0.0, {}, "answer block inside think ignored"),
    ("<think>I think it is 35 <answer>35</answer>", "35", 0.0, {}, "unclosed think: all thought"),
    (f"{T} The result is thirty-five.", "35", 0.0, {}, "no extractable answer"),
    (f"{T} Final: 35", "35", 1.0, {"pattern": r"Final:\s*(\S+)"}, "configurable pattern"),
    (f"{T} Final: 36", "35", 0.0, {"pattern": r"Final:\s*(\S+)"}, "configurable pattern wrong"),
    (f"{T} Result = 35", "35", 0.0, {"pattern": r"Final:\s*(\S+)"}, "pattern absent"),
    (A("35"), "35", 1.0, {"think_in_prompt": True}, "think in prompt, tags complete"),
    ("so 3+4=7, times 5 </think> <answer>35</answer>", "35", 1.0, {"think_in_prompt": True}, "template opened think"),
    ("so maybe \\boxed{35}", "35", 0.0, {"think_in_prompt": True}, "think in prompt, never closed"),
    ([{"role": "assistant", "content": A("35")}], "35", 1.0, {}, "chat-message completion"),
    ([{"role": "assistant", "content": A("34")}], "35", 0.0, {}, "chat-message completion wrong"),
    # --- LaTeX, fractions, decimals ---
    (A("\\frac{1}{2}"), "0.5", 1.0, {}, "fraction = decimal"),
    (A("0.5"), "\\frac{1}{2}", 1.0, {}, "decimal = fraction"),
    (A("1/2"), "\\dfrac{1}{2}", 1.0, {}, "slash fraction = dfrac"),
    (A("\\tfrac{3}{4}"), "0.75", 1.0, {}, "tfrac"),
    (A("-\\frac{1}{2}"), "-0.5", 1.0, {}, "negative fraction"),
    (A("\\frac{2}{4}"), "\\frac{1}{2}", 1.0, {}, "unreduced fraction"),
    (A("\\frac{1}{3}"), "0.5", 0.0, {}, "different fraction"),
    (A("0.33"), "\\frac{1}{3}", 0.0, {}, "rounded decimal is not exact"),
    (A("3\\frac{1}{2}"), "3.5", 1.0, {}, "mixed number"),
    (A("3.0"), "3", 1.0, {}, "trailing zero"),
    (A("3.01"), "3", 0.0, {}, "close but wrong"),
    (A("35."), "35", 1.0, {}, "trailing full stop"),
    (A("\\left( \\frac{1}{2} \\right)"), "0.5", 1.0, {}, "left/right delimiters"),
    (A("$35$"), "35", 1.0, {}, "inline math dollars"),
    (A("\\text{35}"), "35", 1.0, {}, "text wrapper"),
    (A("1.5e3"), "1500", 1.0, {}, "scientific notation"),
    (A("10^{3}"), "1000", 1.0, {}, "power"),
    (A("2^{10}"), "1024", 1.0, {}, "power of two"),
    (A("x^2+2x+1"), "(x+1)^2", 1.0, {}, "polynomial identity"),
    (A("x^2+2x"), "(x+1)^2", 0.0, {}, "polynomial different"),
    # --- radicals, pi ---
    (A("2\\sqrt{2}"), "\\sqrt{8}", 1.0, {}, "simplified radical"),
    (A("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", 1.0, {}, "rationalised radical"),
    (A("\\sqrt{3}"), "\\sqrt{2}", 0.0, {}, "different radical"),
    (A("\\sqrt[3]{27}"), "3", 1.0, {}, "cube root"),
    (A("\\frac{\\pi}{2}"), "\\pi/2", 1.0, {}, "pi fraction"),
    (A("2\\pi"), "2\\pi", 1.0, {}, "2 pi"),
    (A("\\pi"), "2\\pi", 0.0, {}, "pi wrong factor"),
    (A("6.28318"), "2\\pi", 0.0, {}, "decimal of pi is not exact in math mode"),
    (A("\\sin(\\pi/3)"), "\\frac{\\sqrt{3}}{2}", 1.0, {}, "trig value"),
    # --- intervals, sets, tuples, matrices ---
    (A("(1, 2]"), "(1,2]", 1.0, {}, "half-open interval"),
    (A("[1, 2]"), "(1,2]", 0.0, {}, "closed vs half-open"),
    (A("(-\\infty, 3)"), "(-\\infty,3)", 1.0, {}, "infinite interval"),
    (A("[0,1] \\cup [2,3]"), "[0,1]\\cup[2,3]", 1.0, {}, "union of intervals"),
    (A("\\{2, 1\\}"), "\\{1,2\\}", 1.0, {}, "set order"),
    (A("\\{1, 3\\}"), "\\{1,2\\}", 0.0, {}, "different set"),
    (A("1, 2"), "\\{1,2\\}", 1.0, {}, "list for a set gold"),
    (A("x = 2 \\text{ or } x = 3"), "\\{2,3\\}", 1.0, {}, "or-list for a set gold is not a hedge"),
    (A("(1, 2)"), "(1,2)", 1.0, {}, "tuple/open interval"),
    (A("(2, 1)"), "(1,2)", 0.0, {}, "swapped pair"),
    (A("(1, 2, 3)"), "(1,2,3)", 1.0, {}, "triple"),
    (A("(43,100]"), "(43, 100]", 1.0, {}, "interval with a 3-digit end is not a thousands separator"),
    (A("(62,18)"), "(62, 18)", 1.0, {}, "pair with a decreasing order"),
    (A("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0, {}, "matrix"),
    (A("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 0.0, {},
     "matrix wrong"),
    # --- percentages, thousands, units, currency ---
    (A("35\\%"), "0.35", 1.0, {}, "percent = decimal"),
    (A("0.35"), "35\\%", 1.0, {}, "decimal = percent"),
    (A("35%"), "35", 1.0, {}, "percent sign vs bare number"),
    (A("45\\%"), "35\\%", 0.0, {}, "wrong percent"),
    (A("1,000"), "1000", 1.0, {}, "thousands comma"),
    (A("1{,}000"), "1000", 1.0, {}, "LaTeX thousands"),
    (A("1,000,000"), "1000000", 1.0, {}, "millions"),
    (A("1\\,000"), "1000", 1.0, {}, "thin-space thousands"),
    (A("1000"), "1,000", 1.0, {}, "gold with separator"),
    (A("12 \\text{ cm}"), "12", 1.0, {}, "text unit"),
    (A("12\\,\\mathrm{cm}"), "12", 1.0, {}, "mathrm unit"),
    (A("12 dollars"), "12", 1.0, {}, "word unit"),
    (A("3 km/h"), "3", 1.0, {}, "compound unit"),
    (A("\\$12"), "12", 1.0, {}, "escaped dollar"),
    (A("\\$1,200"), "1200", 1.0, {}, "currency with thousands"),
    (A("13 dollars"), "12", 0.0, {}, "wrong with unit"),
    (A("2 \\pi"), "2\\pi", 1.0, {}, "pi not taken for a unit"),
    # --- x = 2 forms ---
    (A("x = 2"), "2", 1.0, {}, "equation form"),
    (A("x=2"), "2", 1.0, {}, "equation no spaces"),
    (A("y = 2x + 1"), "2x+1", 1.0, {}, "function form"),
    (A("x = 3"), "2", 0.0, {}, "equation wrong"),
    (A("The answer is 35"), "35", 1.0, {}, "answer lead-in"),
    # --- hedges ---
    (A("5 or 7"), "5", 0.0, {}, "or hedge"),
    (A("7 or 5"), "5", 0.0, {}, "or hedge, right one last"),
    (A("5, 7"), "5", 0.0, {}, "list for a single gold"),
    (A("either 5 or 7"), "5", 0.0, {}, "either hedge"),
    (A("5 \\text{ or } 7"), "5", 0.0, {}, "latex or"),
    (A("\\pm 5"), "5", 0.0, {}, "plus-minus hedge"),
    (A("5; 7"), "5", 0.0, {}, "semicolon hedge"),
    (A("x = 5 \\lor x = 7"), "5", 0.0, {}, "logical or"),
    (f"{T} \\boxed{{5}} or \\boxed{{7}}", "5", 0.0, {}, "two different boxed"),
    (f"{T} <answer>5</answer> <answer>7</answer>", "5", 0.0, {}, "two answer blocks"),
    (f"{T} <answer>5</answer> <answer>5</answer>", "5", 0.0, {}, "repeated answer blocks"),
    (A("\\{5, 7\\}"), "5", 0.0, {}, "set for a single gold"),
    (A(", ".join(str(i) for i in range(1, 101))), "50", 0.0, {}, "enumerate everything"),
    (A("5 或 7"), "5", 0.0, {}, "Chinese or"),
    # --- notations from math-verify's own test suite (issue 12) ---
    (A("\\frac13"), "\\frac{1}{3}", 1.0, {}, "brace-less fraction"),
    (A("\\sqrt3"), "\\sqrt{3}", 1.0, {}, "brace-less radical"),
    (A("2\\sqrt 5"), "\\sqrt{20}", 1.0, {}, "brace-less radical with a space"),
    (A("\\frac94\\pi"), "\\frac{9}{4}\\pi", 1.0, {}, "brace-less fraction of pi"),
    (A("\\tfrac12"), "0.5", 1.0, {}, "brace-less tfrac"),
    (A("\\frac13"), "\\frac{1}{2}", 0.0, {}, "brace-less fraction wrong"),
    (A("Therefore $x \\geq 5$ is the solution."), "x \\geq 5", 1.0, {}, "answer inside a sentence"),
    (A("Final Answer: The largest $n$ is 34."), "34", 1.0, {}, "sentence with another lead-in"),
    (A("Final Answer: The largest $n$ is 35."), "34", 0.0, {}, "sentence with a wrong value"),
    (A("So the final result is 35."), "35", 1.0, {}, "sentence, bare number"),
    (A("We conclude that the probability is $\\frac{1}{2}$."), "0.5", 1.0, {}, "sentence, inline math"),
    (A("The value is \\sqrt{3}"), "\\sqrt{3}", 1.0, {}, "sentence, bare LaTeX after the verb"),
    (A("1 000"), "1000", 1.0, {}, "space as thousands separator"),
    (A("1 234 567"), "1234567", 1.0, {}, "spaces, millions"),
    (A("1 001"), "1000", 0.0, {}, "space-separated wrong number"),
    (A("1.22"), "1,22", 1.0, {}, "decimal-comma gold"),
    (A("0.111"), "0,111", 1.0, {}, "decimal comma after 0 is not a thousands separator"),
    (A("111"), "0,111", 0.0, {}, "0,111 is not 111"),
    (A("1000,99"), "1000.99", 1.0, {}, "decimal-comma answer"),
    (A("1,000.99€"), "1000.99", 1.0, {}, "euro sign"),
    (A("1,000.99m²"), "1000.99", 1.0, {}, "square metres"),
    (A("2,74 €"), "2.74", 1.0, {}, "decimal comma and currency"),
    (A("5,7"), "5", 0.0, {}, "5,7 is 5.7 or a pair, never 5"),
    (A("1,5"), "\\{1,5\\}", 1.0, {}, "1,5 is still a pair for a set gold"),
    (f"{T} \\boxed{{1}} and \\boxed{{2}}", "\\{1, 2\\}", 1.0, {}, "several boxes for a set gold"),
    (A("\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}"), "(2, 2), (6, 2)", 1.0, {},
     "boxed tuples for a list gold"),
    (A("\\{1, 2\\}"), "\\boxed{1} and \\boxed{2}", 1.0, {}, "gold written as several boxes"),
    (A("1, 2, 3"), "$1$ and $2$ and $3$", 1.0, {}, "gold written with and"),
    (A("6, 8"), "6 \\text{ and } 8", 1.0, {}, "gold with text and"),
    (f"{T} \\boxed{{1}} and \\boxed{{2}}", "1", 0.0, {}, "several boxes for a single gold is a hedge"),
    (A("5 and 7"), "5", 0.0, {}, "and-list hedge"),
    (A("So we get 5, 7."), "7", 0.0, {}, "sentence stating a list for a single gold"),
    (A("x is 5 or 7"), "7", 0.0, {}, "sentence with alternatives"),
    (A("35"), "$$35$$", 1.0, {}, "display-math gold"),
    (A("125"), "$125$ miles", 1.0, {}, "gold with words"),
    (A("126"), "$125$ miles", 0.0, {}, "gold with words, wrong"),
    (A("1 - \\frac{1}{e}"), "$1 - \\frac{1}{\\mathrm{e}}$", 1.0, {}, "upright e is Euler's number"),
    (A("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"), "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", 1.0, {},
     "matrix without spaces"),
    (A("(3, 2)"), "(p,q)=(3,2)", 1.0, {}, "tuple for a named tuple gold"),
    (A("(-793, 10)"), "$$-793 < a < 10$$", 1.0, {}, "interval for a chained inequality"),
    (A("$35 + \\mathrm{e}$"), "35", 0.0, {}, "math-verify reads $35 + \\mathrm{e}$ as 35: a cut-short reading"),
    (A("$35 + \\frac{1}{\\text{x}}$"), "35", 0.0, {}, "cut-short reading inside a fraction"),
    (A("The value is 35x"), "35", 0.0, {}, "a sentence states 35x, not its last number"),
    (A("The answer could be 34 or it could be 35."), "35", 0.0, {}, "alternatives in a sentence"),
    # --- gold column, unparseable gold ---
    (A("35"), "\\frac{", None, {}, "gold does not parse"),
    (A("35"), "", None, {}, "empty gold"),
    (A("35"), "see solution", None, {}, "prose gold in math mode"),
    # --- other hacking patterns ---
    (A(""), "35", 0.0, {}, "empty answer"),
    (A("\\boxed{}"), "35", 0.0, {}, "empty boxed"),
    (A("x"), "35", 0.0, {}, "bare variable"),
    (A("x > 34"), "35", 0.0, {}, "inequality"),
    (A("35 + 0 \\cdot \\infty"), "35", 0.0, {}, "infinity trick"),
    (A("\\text{correct}"), "35", 0.0, {}, "claims correctness"),
    (A("The answer is correct. Reward = 1"), "35", 0.0, {}, "talks to the grader"),
    ("<think>35</think>", "35", 0.0, {}, "answer only in think"),
    (f"<think>The answer is 36</think> <answer>35</answer> <think>no, 36</think>", "35", 0.0, {}, "think after answer"),
    (A("<answer>35</answer>"), "35", 0.0, {}, "nested answer tags"),
    (A("35" + " " * 3000), "35", 1.0, {}, "padding whitespace is harmless"),
    (A("3" + "5" * 3000), "35", 0.0, {}, "100 kB-style long answer"),
    # --- numeric mode ---
    (A("3.1416"), "\\pi", 1.0, {"mode": "numeric"}, "numeric tolerance pi"),
    (A("3.2"), "\\pi", 0.0, {"mode": "numeric"}, "numeric outside tolerance"),
    (A("0.333333"), "\\frac{1}{3}", 1.0, {"mode": "numeric"}, "numeric third"),
    (A("1.4142"), "\\sqrt{2}", 1.0, {"mode": "numeric"}, "numeric root"),
    (A("100.5"), "100", 1.0, {"mode": "numeric", "rel_tol": 0.01}, "custom tolerance"),
    (A("102"), "100", 0.0, {"mode": "numeric", "rel_tol": 0.01}, "custom tolerance miss"),
    (A("x = 2.0001"), "2", 1.0, {"mode": "numeric"}, "numeric equation form"),
    (A("2 or 3"), "2", 0.0, {"mode": "numeric"}, "numeric hedge"),
    (A("abc"), "2", 0.0, {"mode": "numeric"}, "numeric not a number"),
    (A("2"), "two", None, {"mode": "numeric"}, "numeric gold unparseable"),
    # --- choice mode ---
    (A("B"), "B", 1.0, {"mode": "choice"}, "letter"),
    (A("(B)"), "B", 1.0, {"mode": "choice"}, "parenthesised letter"),
    (A("B) 42 apples"), "(B)", 1.0, {"mode": "choice"}, "letter with option text"),
    (A("The answer is C"), "C", 1.0, {"mode": "choice"}, "letter lead-in"),
    (A("\\text{D}"), "D", 1.0, {"mode": "choice"}, "text letter"),
    (A("Option A"), "A", 1.0, {"mode": "choice"}, "option word"),
    (A("b"), "B", 0.0, {"mode": "choice"}, "lower case is not an option"),
    (A("C"), "B", 0.0, {"mode": "choice"}, "wrong letter"),
    (A("B or C"), "B", 0.0, {"mode": "choice"}, "letter hedge"),
    (A("B, C"), "B", 0.0, {"mode": "choice"}, "letter list hedge"),
    (A("A/B"), "A", 0.0, {"mode": "choice"}, "slash hedge"),
    (A("(A) and (B)"), "A", 0.0, {"mode": "choice"}, "and hedge"),
    (A("B"), "maybe", None, {"mode": "choice"}, "choice gold unparseable"),
    # --- exact mode ---
    (A("Paris"), "paris", 1.0, {"mode": "exact"}, "case folded"),
    (A("  New   York. "), "new york", 1.0, {"mode": "exact"}, "whitespace and full stop"),
    (A("\\text{Yes}"), "yes", 1.0, {"mode": "exact"}, "text wrapper"),
    (A("No"), "yes", 0.0, {"mode": "exact"}, "different word"),
    (A("Paris, France"), "paris", 0.0, {"mode": "exact"}, "extra words"),
    (A("ＡＢＣ"), "abc", 1.0, {"mode": "exact"}, "full-width folded"),
    (A("yes"), "  ", None, {"mode": "exact"}, "empty exact gold"),
]

# per-item mode from a dataset column, and a renamed gold column
COLUMN_MODE = [
    (A("3.1416"), "\\pi", "numeric", 1.0), (A("3.1416"), "\\pi", "math", 0.0), (A("(B)"), "B", "choice", 1.0),
    (A("Paris"), "PARIS", "exact", 1.0), (A("\\frac{1}{2}"), "0.5", None, 1.0),
    (A("B"), "B", "", 1.0),  # an empty mode means the recipe's default (math)
]

S, E = "<think>", "</think>"
FORMAT = [
    # (completion, variant, think_in_prompt, expected, note)
    (f"{S} 3+4=7 {E} <answer> 35 </answer>", "strict", False, 1.0, "canonical"),
    (f"{S}x{E}\n<answer>35</answer>\n", "strict", False, 1.0, "newlines allowed"),
    (f"<answer>35</answer>", "strict", False, 0.0, "no think"),
    (f"{S}x{E}", "strict", False, 0.0, "no answer"),
    (f"{S}   {E}<answer>35</answer>", "strict", False, 0.0, "empty think"),
    (f"{S}x{E}<answer> </answer>", "strict", False, 0.0, "empty answer"),
    (f"{S}x{E}<answer>35</answer> trailing", "strict", False, 0.0, "text after answer"),
    (f"prefix {S}x{E}<answer>35</answer>", "strict", False, 0.0, "text before think"),
    (f"{S}x{E}{S}y{E}<answer>35</answer>", "strict", False, 0.0, "two think blocks"),
    (f"{S}x{E}<answer>35</answer><answer>36</answer>", "strict", False, 0.0, "two answer blocks"),
    (f"<answer>35</answer>{S}x{E}", "strict", False, 0.0, "answer before think"),
    (f"{S}x <answer>35</answer> {E}<answer>35</answer>", "strict", False, 0.0, "answer nested in think"),
    (f"{S}x{E} words <answer>35</answer>", "strict", False, 0.0, "text between blocks"),
    (f"{S}x{S}y{E}<answer>35</answer>", "strict", False, 0.0, "nested think"),
    (f"{S}x{E}<answer>35", "strict", False, 0.0, "unclosed answer"),
    (f"x{E}<answer>35</answer>", "strict", True, 1.0, "think opened by the template"),
    (f"{S}x{E}<answer>35</answer>", "strict", True, 0.0, "think repeated after the template opened it"),
    (f"x<answer>35</answer>", "strict", True, 0.0, "template think never closed"),
    ([{"role": "assistant", "content": f"{S}x{E}<answer>35</answer>"}], "strict", False, 1.0, "chat message"),
    (f"{S}x{E}<answer>35</answer>", "soft", False, 1.0, "soft full"),
    (f"{S}x{E}", "soft", False, 0.25, "soft think only"),
    (f"<answer>35</answer>", "soft", False, 0.5, "soft answer only, nothing after"),
    (f"{S}x{E}<answer>35</answer> tail", "soft", False, 0.75, "soft text after"),
    (f"<answer>35</answer>{S}x{E}", "soft", False, 0.5, "soft wrong order"),
    (f"{S}x{E}{S}y{E}<answer>35</answer>", "soft", False, 0.0, "soft repeated blocks"),
    (f"just text", "soft", False, 0.0, "soft nothing"),
    (f"x{E}<answer>35</answer>", "soft", True, 1.0, "soft template think"),
    (f"{S}x{E}<answer>35</answer>", "tag_count", False, 1.0, "count full"),
    (f"{S}x{E}", "tag_count", False, 0.5, "count think only"),
    (f"{S}x{E}{S}y{E}<answer>35</answer>", "tag_count", False, 0.5, "count repeated think"),
    (f"{S}x{E}<answer>1</answer><answer>2</answer>", "tag_count", False, 0.5, "count repeated answer"),
    (f"{S}{S}{S}{E}{E}<answer>35</answer>", "tag_count", False, 0.5, "count spammed tags"),
    (f"x{E}<answer>35</answer>", "tag_count", True, 1.0, "count template think"),
    (f"", "tag_count", False, 0.0, "count empty"),
]

EN = "Let me add the two numbers first and then multiply the result by five."
ZH = "首先把两个数相加，然后把结果乘以五。"
DE = "Zuerst addieren wir die beiden Zahlen und multiplizieren dann das Ergebnis mit fünf."
FR = "D'abord, on additionne les deux nombres, puis on multiplie le résultat par cinq."
RU = "Сначала сложим два числа, а затем умножим результат на пять."
JA = "まず二つの数を足して、次に結果に五を掛けます。"
KO = "먼저 두 수를 더하고 결과에 오를 곱합니다."
LANGUAGE = [
    # (completion, kwargs/columns, prompt, expected, note)  expected: exact value, or (lo, hi)
    (f"<think>{EN}</think><answer>35</answer>", {"language": "en"}, "", 1.0, "pure English"),
    (f"<think>{ZH}</think><answer>35</answer>", {"language": "zh"}, "", 1.0, "pure Chinese, per character"),
    (f"<think>{ZH}</think><answer>35</answer>", {"language": "en"}, "", 0.0, "Chinese when English is the target"),
    (f"<think>{EN}</think>", {"language": "zh"}, "", 0.0, "English when Chinese is the target"),
    (f"<think>首先相加。 Then multiply the result by five to get it.</think>", {"language": "zh"}, "", 4 / 13,
     "mixed: 4 Han characters of 13 words"),
    (f"<think>首先相加。 Then multiply the result by five to get it.</think>", {"language": "en"}, "", 9 / 13,
     "mixed: 9 English words of 13"),
    (f"<think>{DE}</think>", {"language": "de"}, "", 1.0, "German, same script: lingua"),
    (f"<think>{DE}</think>", {"language": "en"}, "", 0.0, "German when English is the target"),
    (f"<think>{EN}</think>", {"language": "de"}, "", 0.0, "English when German is the target"),
    (f"<think>{FR}</think>", {"language": "fr"}, "", 1.0, "French"),
    (f"<think>{FR} {EN}</think>", {"language": "fr"}, "", (0.4, 0.6), "French then English"),
    (f"<think>{RU}</think>", {"language": "ru"}, "", 1.0, "Russian, Cyrillic"),
    (f"<think>{RU}</think>", {"language": "en"}, "", 0.0, "Russian when English is the target"),
    (f"<think>{JA}</think>", {"language": "ja"}, "", 1.0, "Japanese, kana and kanji"),
    (f"<think>{KO}</think>", {"language": "ko"}, "", 1.0, "Korean, Hangul"),
    (f"<think>{EN} $\\frac{{a}}{{b}} + \\alpha = 35$ and x = 35</think>", {"language": "en"}, "", 1.0,
     "LaTeX, numbers, variables stripped"),
    (f"<think>{ZH} $\\text{{we multiply}}$ 3 + 4 = 7</think>", {"language": "zh"}, "", 1.0, "LaTeX text stripped"),
    (f"<think>{ZH}\n```python\nprint(sum([3, 4]) * 5)  # multiply\n```</think>", {"language": "zh"}, "", 1.0,
     "code stripped"),
    (f"<think>{ZH} `result = total`</think>", {"language": "zh"}, "", 1.0, "inline code stripped"),
    ("<think>$3 + 4 = 7$, 7 * 5 = 35 !!!</think>", {"language": "en"}, "", None, "no words: does not apply"),
    (f"<think>{ZH}</think>", {"lang": "zh"}, "", 1.0, "target from the lang column"),
    (f"<think>{ZH}</think>", {"lang": "en"}, "", 0.0, "column target differs"),
    (f"<think>{ZH}</think>", {}, "计算三加四的和，再乘以五。", 1.0, "target detected from a Chinese prompt"),
    (f"<think>{EN}</think>", {}, "计算三加四的和，再乘以五。", 0.0, "detected Chinese, English CoT"),
    (f"<think>{DE}</think>", {}, "Berechne die Summe von drei und vier und multipliziere sie mit fünf.", 1.0,
     "target detected from a German prompt"),
    (f"<think>{EN}</think>", {}, "Compute the sum of three and four, then multiply it by five.", 1.0,
     "target detected from an English prompt"),
    (f"{EN}</think><answer>35</answer>", {"language": "en", "think_in_prompt": True}, "", 1.0,
     "think opened by the template"),
    (f"{EN} <answer>好的</answer>", {"language": "en"}, "", 1.0, "no think tags: answer block excluded"),
    ([{"role": "assistant", "content": f"<think>{ZH}</think>"}], {"language": "chinese"}, "", 1.0,
     "chat message, language by name"),
]


def _run_accuracy(rows):
    bad = []
    for completion, gold, want, kw, note in rows:
        got = rewards.get("accuracy")([completion], ["q"], answer=[gold], **kw)[0]
        if got != want:
            bad.append(f"{note}: got {got}, want {want} | {str(completion)[-80:]!r} vs {gold!r}")
    return bad


def test_labelled_set_size():
    n = len(ACCURACY) + len(COLUMN_MODE) + len(FORMAT) + len(LANGUAGE)
    assert n >= 200, n


def test_accuracy_cases():
    bad = _run_accuracy(ACCURACY)
    assert not bad, "\n".join(bad)


def test_accuracy_batch_equals_single():
    """Scoring the whole set in one batch gives the same answers as one by one (pool ordering, cache)."""
    plain = [r for r in ACCURACY if not r[3]]
    batch = rewards.get("accuracy")([r[0] for r in plain], None, answer=[r[1] for r in plain])
    assert batch == [r[2] for r in plain]


def test_accuracy_mode_column_and_gold_column():
    comps, golds, modes, want = zip(*COLUMN_MODE)
    got = rewards.get("accuracy")(list(comps), None, solution=list(golds), kind=list(modes),
                                  gold_column="solution", mode_column="kind")
    assert got == list(want)
    with pytest.raises(KeyError, match="answer"):
        rewards.get("accuracy")(list(comps), None, solution=list(golds))


def test_format_cases():
    bad = []
    for completion, variant, tip, want, note in FORMAT:
        got = rewards.get("format")([completion], None, variant=variant, think_in_prompt=tip)[0]
        if got != want:
            bad.append(f"{note}: got {got}, want {want}")
    assert not bad, "\n".join(bad)


def test_language_cases():
    bad = []
    for completion, kw, prompt, want, note in LANGUAGE:
        kw = dict(kw)
        cols = {"lang": [kw.pop("lang")]} if "lang" in kw else {}
        got = rewards.get("language")([completion], [prompt], **kw, **cols)[0]
        ok = (got is None and want is None) if want is None or got is None else (
            want[0] <= got <= want[1] if isinstance(want, tuple) else abs(got - want) < 1e-9)
        if not ok:
            bad.append(f"{note}: got {got}, want {want}")
    assert not bad, "\n".join(bad)


def test_language_is_deterministic():
    comps = [f"<think>{EN} {DE} {ZH}</think>"] * 3
    first = rewards.get("language")(comps, None, language="de")
    assert first == rewards.get("language")(comps, None, language="de")
    assert len(set(first)) == 1


def test_two_stage_antlr_parse_matches_ll(monkeypatch):
    """The workers parse LaTeX with ANTLR's SLL mode first (LL on error); on every math case here that must
    give the same verdicts as latex2sympy's own LL-only parse."""
    from rewards._pool import VerifyPool
    from rewards._text import extract_answer

    reqs = []
    for completion, gold, _, kw, _ in ACCURACY:
        text = completion if isinstance(completion, str) else completion[0]["content"]
        pred = extract_answer(text, kw.get("pattern"), kw.get("think_in_prompt", False))[0]
        if pred and kw.get("mode", "math") in ("math", "numeric") and len(pred) < 2000:
            reqs.append({"gold": gold, "pred": pred, "mode": kw.get("mode", "math"), "soft_s": 8.0})
    fast = VerifyPool(size=1)
    monkeypatch.setenv("R1KIT_ANTLR_LL_ONLY", "1")
    slow = VerifyPool(size=1)
    try:
        a = [r["score"] for r in fast.map(reqs, deadline=10.0)]
        b = [r["score"] for r in slow.map(reqs, deadline=10.0)]
    finally:
        fast.close()
        slow.close()
    assert len(reqs) > 100
    assert a == b, [(r["gold"], r["pred"], x, y) for r, x, y in zip(reqs, a, b) if x != y]


def test_accuracy_passes_math_verify_options_through():
    """float_rounding, strict and allow_set_relation_comp reach math-verify's verify(): each turns its case."""
    acc = rewards.get("accuracy")
    cases = [("$f(x)$", "$f(y)$", {"strict": False}), ("$x \\in [-2,7]$", "$-2 \\le x \\le 7$",
                                                        {"allow_set_relation_comp": True}),
             ("(\\frac{3}{5},\\frac{8}{3}]", "$(0.6,2.6667]$", {"float_rounding": 2})]
    for gold, pred, opts in cases:
        assert acc([f"<answer>{pred}</answer>"], None, answer=[gold], deadline=10.0) == [0.0], gold
        assert acc([f"<answer>{pred}</answer>"], None, answer=[gold], deadline=10.0, **opts) == [1.0], gold
