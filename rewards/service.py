"""RewardService: a pool of Ray actors, each running a Scorer (scorer.py), behind one blocking `score(batch)`.

    service = RewardService([{"fn": "math"}], num_workers=2, sample_row={"prompt": "...", "reference": "42"})
    results = service.score([{"prompt": ..., "response": ..., "reference": ...}, ...])  # input order
    service.stats()  # items, items_per_s, restarts, retried, crashed, reasons {"math/correct": n, ...}
    service.shutdown()

The batch is cut into chunks of `chunk_size`; each actor holds at most `max_in_flight` chunks (back-pressure: the
rest wait in the driver, nothing piles up in actor mailboxes). An actor that dies (a custom reward segfaulted or
called os._exit) is replaced by a fresh one; the items of its chunk are retried once, each alone on a healthy
actor, so one poisonous item cannot take its neighbours down; an item that kills a worker twice scores 0 with
reason `error: reward worker crashed twice`. The specs are validated in the driver before any actor starts, so a
bad recipe fails with its one-line RewardConfigError, not with an actor stack trace.

Only this module imports Ray; everything it runs is plain Python tested without Ray.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.result import error_result, reason_category
from rewards.scorer import Scorer
from rewards.specs import resolve_reward_specs, validate_reward_specs

__all__ = ["RewardService"]

log = logging.getLogger(__name__)


class _ScorerActor:
    """The actor body: a Scorer built from plain spec dicts (functions are resolved in the actor's process)."""

    def __init__(self, specs: list[dict], base_dir: str | None):
        self.scorer = Scorer(specs, base_dir=base_dir)

    def score(self, items: list[dict]) -> list[dict]:
        return self.scorer.score(items)

    def ready(self) -> bool:
        return True


class RewardService:
    def __init__(self, specs: Any, *, num_workers: int = 2, num_cpus_per_worker: float = 1.0, chunk_size: int = 16,
                 max_in_flight: int = 2, sample_row: dict | None = None, base_dir: str | Path | None = None):
        import ray

        resolved = (validate_reward_specs(specs, sample_row, base_dir) if sample_row is not None
                    else resolve_reward_specs(specs, base_dir))
        self._specs = [spec.to_dict() for spec in resolved]
        self._base_dir = str(Path(base_dir).resolve()) if base_dir is not None else str(Path.cwd())
        self._remote = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(_ScorerActor)
        self._chunk_size, self._max_in_flight = max(1, chunk_size), max(1, max_in_flight)
        self._actors = [self._start_actor() for _ in range(num_workers)]
        ray.get([actor.ready.remote() for actor in self._actors])
        self._stats = collections.Counter(items=0, batches=0, restarts=0, retried=0, crashed=0)
        self._reasons: collections.Counter[str] = collections.Counter()
        self._busy_s = 0.0

    def _start_actor(self):
        return self._remote.remote(self._specs, self._base_dir)

    def _replace(self, slot: int, dead) -> None:
        """Swap a dead actor for a new one (once per death: other chunks on it see it already replaced)."""
        import ray

        if self._actors[slot] is not dead:
            return
        ray.kill(dead, no_restart=True)
        self._actors[slot] = self._start_actor()
        self._stats["restarts"] += 1
        log.warning("reward service: worker %d died; started a replacement", slot)

    def score(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results in input order; blocks until every item has a result (an error reason counts as one)."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        if not self._actors:
            raise RuntimeError("RewardService.score() after shutdown()")
        start = time.perf_counter()
        items = list(batch)
        for i, item in enumerate(items):  # the caller's bug: say so here, not as a remote stack trace
            missing = [k for k in ("prompt", "response", "reference") if k not in item]
            if missing:
                raise ValueError(f"item {i} has no {missing[0]!r} (fields: {', '.join(map(str, item))})")
        results: list[dict | None] = [None] * len(items)
        pending = collections.deque(  # (item indices, attempt)
            (list(range(i, min(i + self._chunk_size, len(items)))), 0) for i in range(0, len(items), self._chunk_size))
        in_flight: dict[Any, tuple[int, Any, list[int], int]] = {}  # ref -> (slot, actor, indices, attempt)
        load, alone = [0] * len(self._actors), [False] * len(self._actors)
        while pending or in_flight:
            while pending:
                indices, attempt = pending[0]
                # a retried item runs alone on its actor: if that actor dies, the item is the only suspect
                free = [s for s in range(len(self._actors))
                        if not alone[s] and (load[s] == 0 if attempt else load[s] < self._max_in_flight)]
                if not free:
                    break
                slot = min(free, key=load.__getitem__)
                pending.popleft()
                actor = self._actors[slot]
                in_flight[actor.score.remote([items[i] for i in indices])] = (slot, actor, indices, attempt)
                load[slot] += 1
                alone[slot] = attempt > 0
            done, _ = ray.wait(list(in_flight), num_returns=1)
            slot, actor, indices, attempt = in_flight.pop(done[0])
            load[slot] -= 1
            alone[slot] = alone[slot] and load[slot] > 0
            try:
                for i, result in zip(indices, ray.get(done[0])):
                    results[i] = result
            except (RayActorError, WorkerCrashedError):
                self._replace(slot, actor)
                if attempt == 0:  # retry each item alone, so only a poisonous item fails twice
                    pending.extend(([i], 1) for i in indices)
                    self._stats["retried"] += len(indices)
                else:
                    self._stats["crashed"] += len(indices)
                    for i in indices:
                        results[i] = self._crashed_result()
        self._busy_s += time.perf_counter() - start
        self._stats["items"] += len(items)
        self._stats["batches"] += 1
        for result in results:
            for name, reason in result["reasons"].items():
                self._reasons[f"{name}/{reason_category(reason)}"] += 1
        return results  # type: ignore[return-value]

    def _crashed_result(self) -> dict[str, Any]:
        result = error_result("reward worker crashed twice while scoring this item")
        result["reasons"] = {spec["name"]: result["reason"] for spec in self._specs}
        return result

    def stats(self) -> dict[str, Any]:
        """Throughput and outcome counters since start (driver-side view, all workers together)."""
        out: dict[str, Any] = dict(self._stats)
        out.update(busy_s=self._busy_s, workers=len(self._actors), reasons=dict(self._reasons),
                   items_per_s=self._stats["items"] / self._busy_s if self._busy_s else 0.0)
        return out

    def shutdown(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
