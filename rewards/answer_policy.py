"""What counts as ONE final math answer: cheap string checks run on every extracted answer before any parsing.

A policy that is paid for `correct` learns whatever math-verify leniently accepts. These checks reject, with their
own reason and score 0, answers that are not one answer in plain LaTeX, before sympy ever sees them:

- `too_complex`: longer than `max_answer_chars` (500 by default), brackets nested deeper than 16, a numeric power
  tower (an exponent or a base that itself holds `^` or `!` and no variable, or `a^b^c`), an exponent with 6+
  digits, a factorial of a 5+ digit number or of a numeric operand holding `^`/`!`. Such values cost sympy minutes (`10^{10^{10}}`) or are built to; the
  reference may contain the same construct, then it is allowed.
- `candidate_list`: the answer hedges: it uses `or` / `and` / `either`, `\\lor`, `\\vee`, an ellipsis (`...`, `\\ldots`,
  `\\cdots`, `…`), `\\approx` / `\\sim`, that the reference does not use, or lists more items (top-level `,` / `;`,
  each `\\pm` counting twice) than the reference. `\\boxed{1, 2, ..., 100}`, `3 \\text{ or } 4`, `\\pm 3` for `3`.
- `bad_format`: a character that only looks like plain math: a digit of another script (Arabic-Indic `٣`), a
  compatibility form (fullwidth `３`, mathematical bold `𝟑`, superscript `²`), a letter of a script other than Latin
  or Greek (Cyrillic `х` for `x`), or an invisible format character (zero-width space, bidi override).

Everything here is linear in the answer's length (which `max_answer_chars` caps first). Pure functions.
"""
from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_ANSWER_CHARS", "MAX_NESTING", "screen_answer"]

MAX_ANSWER_CHARS = 500
MAX_NESTING = 16
MAX_EXPONENT_DIGITS = 5  # 10^{99999} is fine for sympy; 10^{10^6} digits is not
MAX_FACTORIAL_DIGITS = 4  # 9999! takes milliseconds, 10^6! seconds

_HEDGE = re.compile(
    r"(?<![A-Za-z\\])(?:or|and|either)(?![A-Za-z])"
    r"|\\(?:lor|land|vee|ldots|dots|cdots|dotsc|dotsb|approx|sim|simeq|thickapprox)(?![A-Za-z])"
    r"|\.\.\.|…|≈|∨",
    re.IGNORECASE)
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])|±|∓")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_OPEN, _CLOSE = "([{", ")]}"
_INTEGER = re.compile(r"\d+")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_OPERAND = re.compile(r"\\[A-Za-z]+|\d+|.", re.DOTALL)


# ------------------------------------------------------------------------------------------------ pieces
def nesting_depth(text: str) -> int:
    """Deepest nesting of (), [], {} (escaped or not) anywhere in the text."""
    depth = deepest = 0
    for ch in text:
        if ch in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
    return deepest


def item_count(text: str) -> int:
    """Items the answer lists: top-level `,` / `;` separated parts (thousands separators are not separators),
    each `\\pm` / `\\mp` doubling: `3` 1, `(1, 2)` 1, `1, 2` 2, `\\pm 3` 2, `1,000` 1."""
    text = _THOUSANDS.sub("", text)
    depth, parts = 0, 1
    for i, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch in ",;" and depth == 0 and not (i and text[i - 1] == "\\"):  # `\,` and `\;` are LaTeX spaces
            parts += 1
    return parts * 2 ** min(len(_PLUS_MINUS.findall(text)), 8)


def hedges(text: str) -> set[str]:
    return {m.group(0).lower() for m in _HEDGE.finditer(text)}


def _group_after(text: str, i: int) -> tuple[str, int]:
    """The operand starting at text[i]: a brace group's content, a `\\command`, a digit run or one character;
    (operand, index after it). Skips spaces."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return "", i
    if text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j], j + 1
        return text[i + 1 :], len(text)
    match = _OPERAND.match(text, i)
    return match.group(0), match.end()


def _group_before(text: str, i: int) -> str:
    """The operand ending just before text[i]: a bracketed group with its content or a digit run, with any
    factorial marks after it (`9999!` before `^`)."""
    j = i - 1
    while j >= 0 and text[j] == " ":
        j -= 1
    if j < 0:
        return ""
    if text[j] == "!":
        return _group_before(text, j) + text[j:i].strip()
    if text[j] in _CLOSE:
        depth = 0
        for k in range(j, -1, -1):
            depth += 1 if text[k] in _CLOSE else -1 if text[k] in _OPEN else 0
            if depth == 0:
                return text[k : j + 1]
        return text[: j + 1]
    k = j
    while k >= 0 and text[k].isdigit():
        k -= 1
    return text[k + 1 : j + 1]


def _numeric(operand: str) -> bool:
    """No variable in it (LaTeX commands such as \\frac or \\pi removed first): sympy evaluates it to a number."""
    return not re.search(r"[A-Za-z]", _COMMAND.sub("", operand))


def huge_value(text: str) -> str | None:
    """Why the answer's value would be astronomically large to compute, or None. Only numeric operands count:
    `e^{-x^2}` or `(x^2+1)^2` stay symbolic and cost sympy nothing."""
    for i, ch in enumerate(text):
        if ch == "^":
            exponent, after = _group_after(text, i + 1)
            base = _group_before(text, i)
            if ("^" in exponent or "!" in exponent) and _numeric(exponent):
                return f"power tower in exponent {exponent[:40]!r}"
            if ("^" in base or "!" in base) and _numeric(base):
                return f"power of {base[:40]!r}"
            if text[after:].lstrip(" ").startswith("^"):
                return "chained exponents a^b^c"
            digits = _INTEGER.fullmatch(exponent.strip())
            if digits and len(digits.group(0)) > MAX_EXPONENT_DIGITS:
                return f"exponent with {len(digits.group(0))} digits"
        elif ch == "!" and not text.startswith("!=", i):
            operand = _group_before(text, i)
            if operand.isdigit() and len(operand) > MAX_FACTORIAL_DIGITS:
                return f"factorial of a {len(operand)}-digit number"
            if ("^" in operand or "!" in operand) and _numeric(operand):
                return f"factorial of {operand[:40]!r}"
    return None


def lookalike(text: str) -> str | None:
    """The first character that only looks like plain math (see the module docstring), described, or None."""
    for ch in text:
        if ch.isascii():
            continue
        category = unicodedata.category(ch)
        if category == "Zs":  # a no-break or thin space: still a space
            continue
        name = unicodedata.name(ch, f"U+{ord(ch):04X}")
        if category == "Nd":
            return f"non-ASCII digit {ch!r} ({name})"
        if category in ("Cf", "Co", "Cn", "Cs"):
            return f"invisible or unassigned character U+{ord(ch):04X} ({name})"
        if unicodedata.normalize("NFKC", ch) != ch:
            return f"compatibility character {ch!r} ({name})"
        if category.startswith("L") and not name.startswith(("LATIN", "GREEK")):
            return f"look-alike letter {ch!r} ({name})"
    return None


# ------------------------------------------------------------------------------------------------ policy
def screen_answer(answer: str, gold: str, max_answer_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """None when `answer` may go to math-verify, else the reason (`category: detail`) it scores 0."""
    if len(answer) > max_answer_chars:
        return f"too_complex: answer of {len(answer)} chars > {max_answer_chars}"
    depth = nesting_depth(answer)
    if depth > MAX_NESTING and depth > nesting_depth(gold):
        return f"too_complex: brackets nested {depth} deep > {MAX_NESTING}"
    extra = sorted(hedges(answer) - hedges(gold))
    if extra:
        return f"candidate_list: the answer hedges with {extra[0]!r}, the reference does not"
    items, gold_items = item_count(answer), item_count(gold)
    if items > gold_items:
        return f"candidate_list: the answer lists {items} items, the reference {gold_items}"
    odd = lookalike(answer)
    if odd:
        return f"bad_format: {odd}"
    huge = huge_value(answer)
    if huge and not huge_value(gold):
        return f"too_complex: {huge}"
    return None
