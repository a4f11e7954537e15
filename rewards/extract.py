"""Pull the final answer (math) or the program (code) out of a model response. Pure string functions.

Math methods, tried in the order a recipe lists them (default: boxed, then hash):
- `boxed`: the content of the LAST `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced; `\\boxed 5` too.
- `hash`: the text after the last `####` (GSM8K), to the end of that line.
- `last_number`: the last number in the text (`1,234.5`, `-3`, `2/3`), thousands separators removed.
- `regex:<pattern>`: group 1 of the LAST match of a recipe-given pattern (group 0 when it has no group).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["METHODS", "after_hash", "extract_answer", "extract_code", "last_boxed", "last_number", "last_regex"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _balanced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace (\{ in a set) does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _balanced(text, end)
            if content is not None:
                return content.strip()
        elif end < len(text) and match.group(0).endswith((" ", "\t")):  # `\boxed 5`: one token
            token = re.match(r"[^\s$]+", text[end:])
            if token:
                return token.group(0)
    return None


def after_hash(text: str) -> str | None:
    idx = text.rfind("####")
    if idx < 0:
        return None
    answer = text[idx + 4 :].strip().split("\n", 1)[0].strip()
    return answer or None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return re.sub(r"[,\s]", "", matches[-1]) if matches else None


def last_regex(text: str, pattern: str) -> str | None:
    matches = list(re.finditer(pattern, text, flags=re.DOTALL))
    if not matches:
        return None
    found = matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)
    return found.strip() if found and found.strip() else None


METHODS = ("boxed", "hash", "last_number")


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
