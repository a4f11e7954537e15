"""Pull the final answer (math) or the program (code) out of a model response. Pure string functions.

Math methods (a recipe lists which, in priority order; default: boxed, then hash). Each finds EVERY final answer
its marker gives, in order; rewards/math_reward.py decides what several of them mean (they must agree):
- `boxed`: the content of every outermost `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced, `\\{` and
  `\\}` escaped; `\\boxed 5` (one token) too. One linear pass over the text, whatever it holds.
- `hash`: the text after each `####` (GSM8K), to the end of its line.
- `regex:<pattern>`: group 1 of every match of a recipe-given pattern (group 0 when it has no group).
- `last_number`: the last number in the text (`1,234.5`, `-3`, `2/3`), thousands separators removed. It finds a
  number in any text (random text included), so it is a fallback only, used when no marker above finds anything.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["METHODS", "after_hash", "all_after_hash", "all_boxed", "all_regex", "extract_answer", "extract_code",
           "final_answers", "last_boxed", "last_number", "last_regex"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_TOKEN = re.compile(r"[^\s$]+")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _brace_pairs(text: str) -> dict[int, int]:
    """{index of an unescaped '{': index of its matching '}'} for every group that closes, in one pass.

    A brace right after a backslash (`\\{` in a set) is escaped and does not open or close a group."""
    pairs, stack = {}, []
    for i, ch in enumerate(text):
        if ch not in "{}" or (i and text[i - 1] == "\\"):
            continue
        if ch == "{":
            stack.append(i)
        elif stack:
            pairs[stack.pop()] = i
    return pairs


def all_boxed(text: str) -> list[str]:
    """Contents of every outermost `\\boxed{...}` / `\\fbox{...}` (a box inside a box is part of its content), in
    order, stripped; linear in the text (a 1 MB string of unclosed `\\boxed{` is no slower than any other)."""
    pairs = None
    out, covered_to = [], -1
    for match in _BOXED.finditer(text):
        end = match.end()
        if match.start() < covered_to or end >= len(text):
            continue
        if text[end] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            close = pairs.get(end)
            if close is not None:
                out.append(text[end + 1 : close].strip())
                covered_to = close
        elif match.group(0).endswith((" ", "\t")):  # `\\boxed 5`: one token
            token = _TOKEN.match(text, end)
            if token:
                out.append(token.group(0))
    return out


def last_boxed(text: str) -> str | None:
    found = all_boxed(text)
    return found[-1] if found else None


def all_after_hash(text: str) -> list[str]:
    """The rest of the line after every `####` (GSM8K's final-answer marker), non-empty ones, in order."""
    out = []
    for part in text.split("####")[1:]:
        answer = part.split("\n", 1)[0].strip()
        if answer:
            out.append(answer)
    return out


def after_hash(text: str) -> str | None:
    idx = text.rfind("####")
    if idx < 0:
        return None
    answer = text[idx + 4 :].strip().split("\n", 1)[0].strip()
    return answer or None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return re.sub(r"[,\s]", "", matches[-1]) if matches else None


def all_regex(text: str, pattern: str) -> list[str]:
    out = []
    for match in re.finditer(pattern, text, flags=re.DOTALL):
        found = match.group(1) if match.re.groups else match.group(0)
        if found and found.strip():
            out.append(found.strip())
    return out


def last_regex(text: str, pattern: str) -> str | None:
    matches = list(re.finditer(pattern, text, flags=re.DOTALL))
    if not matches:
        return None
    found = matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)
    return found.strip() if found and found.strip() else None


METHODS = ("boxed", "hash", "last_number")


def final_answers(text: str, methods: Iterable[str] = ("boxed", "hash")) -> list[tuple[str, str]]:
    """Every final answer the marker methods find, as (answer, method): the methods' finds in the recipe's order,
    each method's in text order. `last_number` contributes only when no marker method found anything."""
    found: list[tuple[str, str]] = []
    for method in methods:
        if method == "boxed":
            found += [(a, method) for a in all_boxed(text)]
        elif method == "hash":
            found += [(a, method) for a in all_after_hash(text)]
        elif method.startswith("regex:"):
            found += [(a, method) for a in all_regex(text, method[len("regex:") :])]
        elif method != "last_number":
            raise ValueError(f"unknown answer extraction method {method!r}; use one of {METHODS} or 'regex:<pattern>'")
    if not found and "last_number" in methods:
        number = last_number(text)
        found = [(number, "last_number")] if number else []
    return found


def extract_answer(text: str, methods: Iterable[str] = ("boxed", "hash")) -> tuple[str | None, str]:
    """(answer, method that found it) or (None, "") when no method finds one."""
    for method in methods:
        if method == "boxed":
            found = last_boxed(text)
        elif method == "hash":
            found = after_hash(text)
        elif method == "last_number":
            found = last_number(text)
        elif method.startswith("regex:"):
            found = last_regex(text, method[len("regex:") :])
        else:
            raise ValueError(f"unknown answer extraction method {method!r}; use one of {METHODS} or 'regex:<pattern>'")
        if found:
            return found, method
    return None, ""


def extract_code(text: str, how: str = "auto", language: str = "python") -> str | None:
    """The program in a response.

    `last_block` / `first_block`: a fenced block (``` with the language tag or none); `raw`: the whole response;
    `auto`: the last fenced block if there is one, else the raw response. None when nothing is left."""
    if how == "raw":
        return text if text.strip() else None
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    wanted = [body for tag, body in blocks if tag in ("", language, "py" if language == "python" else language)]
    if how in ("last_block", "auto") and wanted:
        return wanted[-1] if wanted[-1].strip() else None
    if how == "first_block" and wanted:
        return wanted[0] if wanted[0].strip() else None
    if how == "auto" and not blocks:
        return text if text.strip() else None
    if how not in ("auto", "last_block", "first_block"):
        raise ValueError(f"unknown code extraction {how!r}; use auto, last_block, first_block or raw")
    return None
