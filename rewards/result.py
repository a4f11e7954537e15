"""The one result format every reward returns, and the error raised for a bad reward configuration.

A scored item is a plain dict (it crosses Ray actor boundaries and lands in logs as-is):

    {"score": float, "reason": str, "metrics": {str: float}}

`reason` always says why: `correct`, `wrong`, `no_answer`, `timeout`, `error: <detail>`, ... Its *category* is the
part before the first ':' and is what gets counted; the rest is detail for humans (per-test outcomes of code, the
exception text of an error). A reward never returns 0 without a reason.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any

from rollout.errors import OneLineError, one_line

REASON_LIMIT = 300  # characters of an error reason (reasons are log lines)

__all__ = ["REASON_LIMIT", "RewardConfigError", "as_float", "error_result", "make_result", "reason_category"]


class RewardConfigError(OneLineError):
    """A reward spec that cannot work (bad path, missing function, wrong signature, non-numeric return).

    The message is exactly one line and starts with the recipe field, e.g. `reward[1].fn: ...`."""

    limit = 1000


def as_float(value: Any) -> float | None:
    """`value` as a finite float, or None when it is not a real number (bools count: True is 1.0)."""
    if isinstance(value, Real) and not isinstance(value, complex):
        out = float(value)
        return out if math.isfinite(out) else None
    # numpy / torch scalars are not numbers.Real subclasses in every version; accept anything with .item()
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return as_float(item())
        except (TypeError, ValueError):
            return None
    return None


def make_result(score: float, reason: str, **metrics: float) -> dict[str, Any]:
    return {"score": float(score), "reason": reason, "metrics": {k: float(v) for k, v in metrics.items()}}


def error_result(detail: str) -> dict[str, Any]:
    """Score 0 because scoring itself failed; the reason carries the cause, so it is counted, never silent."""
    return make_result(0.0, "error: " + one_line(detail, REASON_LIMIT))


def reason_category(reason: str) -> str:
    """`wrong: 2/5 tests passed [...]` -> `wrong`; `error: ValueError: x` -> `error`."""
    return reason.split(":", 1)[0].strip() or "unknown"
