"""Score batches with one or more rewards and combine them: the plain-Python core of RewardService.

    scorer = Scorer([{"fn": "math"}, {"fn": "examples/rewards/length_bonus.py:score", "weight": 0.1}],
                    sample_row={"prompt": "1+1?", "reference": "2"})
    scorer.score([{"prompt": ..., "response": ..., "reference": ...}, ...])
    -> [{"score": 1.05, "reason": "correct", "metrics": {"math": 1.0, "math/correct": 1.0, "length_bonus": 0.5},
         "reasons": {"math": "correct", "length_bonus": "ok"}}, ...]

score = sum of weight * component score. `metrics` holds every component's unweighted score under its name and
its own metrics under `name/key`. `reason` is the first component's reason, unless a component failed: then it
is that component's `error: name: ...`, so a failure is never hidden behind another component's `correct`.
A reward that raises or returns garbage scores 0 for that component with an `error: ...` reason, logged and
counted in `stats()`; the batch goes on.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.result import error_result, reason_category
from rewards.specs import (
    ITEM_FIELDS,
    RewardSpec,
    resolve_reward_specs,
    run_sync,
    to_result,
    validate_reward_specs,
)
from rollout.errors import one_line

__all__ = ["Scorer"]

log = logging.getLogger(__name__)
_LOGGED_ERRORS = 20  # per component, then every 100th: a broken reward must not flood the driver's log


class Scorer:
    def __init__(self, specs: Any, *, base_dir: str | Path | None = None, sample_row: dict | None = None,
                 async_concurrency: int = 32):
        """Resolve `specs` (and call each once on `sample_row` when given: see validate_reward_specs)."""
        self.rewards: list[RewardSpec] = (validate_reward_specs(specs, sample_row, base_dir) if sample_row is not None
                                          else resolve_reward_specs(specs, base_dir))
        self._async_limit = async_concurrency
        self._reasons: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._items, self._busy_s = 0, 0.0

    # ------------------------------------------------------------------------------------------ components
    def _result(self, spec: RewardSpec, value: Any) -> dict[str, Any]:
        try:
            return to_result(value)
        except ValueError as exc:
            return error_result(f"{spec.name}: {exc}")

    def _call_single(self, spec: RewardSpec, item: dict, extras: dict) -> dict[str, Any]:
        try:
            return self._result(spec, spec.fn(*(item[k] for k in ITEM_FIELDS), **spec.kwargs, **extras))
        except Exception as exc:  # the user's reward failed on this item: an error reason, not a crash of the batch
            return error_result(f"{spec.name}: {type(exc).__name__}: {exc}")

    async def _gather(self, spec: RewardSpec, items: Sequence[dict], extras: list[dict]) -> list[dict[str, Any]]:
        limit = asyncio.Semaphore(self._async_limit)

        async def one(item: dict, extra: dict) -> dict[str, Any]:
            async with limit:
                try:
                    value = await spec.fn(*(item[k] for k in ITEM_FIELDS), **spec.kwargs, **extra)
                except Exception as exc:  # as in _call_single
                    return error_result(f"{spec.name}: {type(exc).__name__}: {exc}")
                return self._result(spec, value)

        return list(await asyncio.gather(*(one(it, ex) for it, ex in zip(items, extras))))

    def _component(self, spec: RewardSpec, items: Sequence[dict]) -> list[dict[str, Any]]:
        fields = [k for k in spec.extra_fields if any(k in item for item in items)]
        if spec.kind == "single":
            extras = [{k: item[k] for k in fields if k in item} for item in items]
            if spec.is_async:
                return run_sync(self._gather(spec, items, extras))
            return [self._call_single(spec, item, extra) for item, extra in zip(items, extras)]
        columns = [[item[k] for item in items] for k in ITEM_FIELDS]
        try:
            out = spec.fn(*columns, **spec.kwargs, **{k: [item.get(k) for item in items] for k in fields})
            if inspect.isawaitable(out):
                out = run_sync(out)
        except Exception as exc:  # one failure of a batch reward fails its whole batch, each item saying why
            return [error_result(f"{spec.name}: {type(exc).__name__}: {exc}")] * len(items)
        if not isinstance(out, (list, tuple)) or len(out) != len(items):
            size = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            return [error_result(f"{spec.name}: returned {size} results for {len(items)} items")] * len(items)
        return [self._result(spec, value) for value in out]

    # ------------------------------------------------------------------------------------------ batches
    def score(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(items):
            missing = [k for k in ITEM_FIELDS if k not in item]
            if missing:
                raise ValueError(f"item {i} has no {missing[0]!r} (fields: {', '.join(map(str, item))})")
        start = time.perf_counter()
        per_component = [self._component(spec, items) for spec in self.rewards]
        results = [self._combine([parts[i] for parts in per_component]) for i in range(len(items))]
        self._busy_s += time.perf_counter() - start
        self._items += len(items)
        return results

    def _combine(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        reasons: dict[str, str] = {}
        for spec, part in zip(self.rewards, parts):
            metrics[spec.name] = part["score"]
            metrics.update({f"{spec.name}/{k}": v for k, v in part["metrics"].items()})
            reasons[spec.name] = part["reason"]
            self._count(spec.name, part["reason"])
        errors = [r for r in reasons.values() if reason_category(r) == "error"]
        return {"score": sum(spec.weight * part["score"] for spec, part in zip(self.rewards, parts)),
                "reason": errors[0] if errors else parts[0]["reason"], "metrics": metrics, "reasons": reasons}

    def _count(self, name: str, reason: str) -> None:
        category = reason_category(reason)
        self._reasons[f"{name}/{category}"] += 1
        if category == "error":
            self._errors[name] += 1
            n = self._errors[name]
            if n <= _LOGGED_ERRORS or n % 100 == 0:
                log.warning("reward %s: %s (error #%d)", name, one_line(reason, 500), n)

    def stats(self) -> dict[str, Any]:
        """Counters since start: items, busy seconds, items/s, reason counts per `component/category`."""
        return {"items": self._items, "busy_s": self._busy_s,
                "items_per_s": self._items / self._busy_s if self._busy_s else 0.0,
                "errors": sum(self._errors.values()), "reasons": dict(self._reasons)}
