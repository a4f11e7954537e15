"""RolloutWorker: a rollout engine behind a thin Ray actor.

The class itself imports no Ray and is tested without it; the driver makes it an actor with
`ray.remote(RolloutWorker)` (launch/driver_roles.py, with its restart and placement options). Everything that
crosses the boundary is token ids and tensors (GenerationRequest in, Trajectory out).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from rollout.engine import RolloutEngine, make_engine
from rollout.sampling import GenerationRequest
from rollout.trajectory import Trajectory


class RolloutWorker:
    def __init__(self, model_dir: str | Path, *, engine: str = "torch", progress: bool = False, **engine_options):
        self.engine: RolloutEngine = make_engine(engine, model_dir, progress=progress, **engine_options)
        self._metrics: dict = {}

    def ready(self) -> bool:
        return True

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        start = time.perf_counter()
        trajectories = self.engine.generate(list(requests))
        self._metrics = rollout_metrics(trajectories, time.perf_counter() - start)
        return trajectories

    def update_weights(self, weights, version: int, *, final: bool = True) -> int:
        self.engine.update_weights(weights, version, final=final)
        return self.engine.policy_version

    def release(self) -> None:
        self.engine.release()

    def policy_version(self) -> int:
        return self.engine.policy_version

    def metrics(self) -> dict:
        """Metrics of the last generate call."""
        return dict(self._metrics)


def rollout_metrics(trajectories: Sequence[Trajectory], seconds: float) -> dict:
    """tokens/s, NFE, tokens per forward (per request: its tokens over the forwards it took), finish reasons."""
    done = [t for t in trajectories if not t.finish_reason.startswith("error")]
    tokens = sum(t.response_length for t in done)
    metrics = {
        "rollout/seconds": seconds,
        "rollout/requests": len(trajectories),
        "rollout/response_tokens": tokens,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "rollout/nfe_mean": sum(t.nfe for t in done) / len(done) if done else 0.0,
        "rollout/tokens_per_forward": (sum(t.response_length / t.nfe for t in done if t.nfe) / len(done)
                                       if done else 0.0),
    }
    reasons = Counter("error" if t.finish_reason.startswith("error") else t.finish_reason for t in trajectories)
    metrics.update({f"rollout/finish/{reason}": count for reason, count in sorted(reasons.items())})
    return metrics

