"""Example custom rewards in the two other supported forms: a batch function and an async function.

    reward:
      - fn: examples/rewards/batch_and_async.py:keyword_batch      # one call per batch
        kwargs: {keyword: "therefore"}
      - fn: examples/rewards/batch_and_async.py:judge             # awaited; many items in flight at once
        weight: 0.5

A batch reward is recognised by `@reward(batch=True)`, by the name `score_batch`, or by a first parameter named
`prompts`; it returns one float or dict per item. An async reward is any `async def` (e.g. a call to a judge model
over HTTP); the scorer gathers the items of a batch concurrently.
"""
from __future__ import annotations

import asyncio
from typing import Any

from rewards.registry import reward


@reward(batch=True)
def keyword_batch(prompts: list[str], responses: list[str], references: list[Any],
                  keyword: str = "therefore", **kwargs: Any) -> list[float]:
    return [float(keyword in response.lower()) for response in responses]


async def judge(prompt: str, response: str, reference: Any, **kwargs: Any) -> dict[str, Any]:
    await asyncio.sleep(0.01)  # stands in for an HTTP request to a judge model
    agrees = str(reference).strip() in response
    return {"score": float(agrees), "reason": "correct" if agrees else "wrong"}
