"""Example custom reward: a small bonus for concise responses.

Use it from a recipe beside a correctness reward (paths are relative to the recipe's folder):

    reward:
      - fn: math
      - fn: examples/rewards/length_bonus.py:score
        weight: 0.1
        kwargs: {target_chars: 400}

The documented signature: score(prompt, response, reference, **kwargs) -> float | dict. A dict carries `score`,
optionally `reason`, and any other numeric keys, which are logged as metrics (here `length_bonus/chars`).
"""
from __future__ import annotations

from typing import Any


def score(prompt: str, response: str, reference: Any, target_chars: int = 400, **kwargs: Any) -> dict[str, Any]:
    if target_chars <= 0:
        raise ValueError(f"target_chars must be positive, got {target_chars}")
    chars = len(response.strip())
    bonus = max(0.0, 1.0 - chars / target_chars)  # 1 for an empty-ish answer, 0 at or beyond the target
    return {"score": bonus, "reason": "ok" if chars <= target_chars else "too_long", "chars": chars}
