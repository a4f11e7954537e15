"""Small shaping terms: a format reward and a length penalty. Pure functions, also registered as rewards.

    format:          1.0 when the response matches `pattern` (default: it contains a \\boxed{...} answer), else 0.0
    length_penalty:  -coef * min(1, excess / max_length), excess = max(0, length - max_length)

Length is the response's token count when the caller passes `response_len` (the trajectory knows it), else its
character count; both are documented in the reason so a log line says which one was used.
"""
from __future__ import annotations

import re
from typing import Any

from rewards.extract import last_boxed
from rewards.result import make_result

__all__ = ["format_ok", "format_reward", "length_penalty", "length_penalty_reward"]


def format_ok(response: str, pattern: str | None = None) -> bool:
    """True when the response is well-formed: matches `pattern` (re.search, DOTALL) or, without one, has a box."""
    if pattern:
        return re.search(pattern, response, flags=re.DOTALL) is not None
    return last_boxed(response) is not None


def length_penalty(length: int, max_length: int | None, coef: float) -> float:
    """A value <= 0: linear in the excess over max_length, saturating at -coef when twice as long."""
    if not coef or not max_length or length <= max_length:
        return 0.0
    return -coef * min(1.0, (length - max_length) / max_length)


def format_reward(prompt: str, response: str, reference: Any, pattern: str | None = None,
                  score: float = 1.0, **_: Any) -> dict[str, Any]:
    ok = format_ok(response, pattern)
    return make_result(score if ok else 0.0, "ok" if ok else "bad_format", format=float(ok))


def length_penalty_reward(prompt: str, response: str, reference: Any, max_length: int = 1024, coef: float = 1.0,
                          response_len: int | None = None, **_: Any) -> dict[str, Any]:
    unit, length = ("tokens", response_len) if response_len is not None else ("chars", len(response))
    penalty = length_penalty(length, max_length, coef)
    reason = "ok" if penalty == 0 else f"too_long: {length} {unit} > {max_length}"
    return make_result(penalty, reason, length=float(length))
