"""RolloutWorker: a rollout engine behind a thin Ray actor.

The class itself imports no Ray and is tested without it; the driver makes it an actor with
`ray.remote(RolloutWorker)` (launch/driver_roles.py, with its restart and placement options). Everything that
crosses the boundary is token ids and tensors (GenerationRequest in, Trajectory out).
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Sequence

from rollout.devices import actor_device
from rollout.engine import RolloutEngine, make_engine
from rollout.sampling import GenerationRequest
from rollout.trajectory import Trajectory


class RolloutWorker:
    """device: the recipe's resources.device ("auto" | "cpu" | "cuda"), resolved here, inside the actor, by
    rollout.devices.actor_device (the GPU Ray assigned, else the CPU); the torch engine loads its model there.
    vLLM places itself on the GPU Ray assigned."""

    def __init__(self, model_dir: str | Path, *, engine: str = "torch", progress: bool = False,
                 device: str = "auto", **engine_options):
        self.device = actor_device(device)
        if engine == "torch":
            engine_options["device"] = self.device
        self.engine: RolloutEngine = make_engine(engine, model_dir, progress=progress, **engine_options)
        self._metrics: dict = {}
        self._sync_member = None  # membership in the learner's weight-sync group (rollout/weight_collective.py)
        self._incarnation = uuid.uuid4().hex  # a restarted actor is a new member: the driver forms a new group

    def ready(self) -> bool:
        return True

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        start = time.perf_counter()
        trajectories = self.engine.generate(list(requests))
        self._metrics = rollout_metrics(trajectories, time.perf_counter() - start, self.engine.memory_metrics())
        return trajectories

    def update_weights(self, weights, version: int, *, final: bool = True) -> int:
        self.engine.update_weights(weights, version, final=final)
        return self.engine.policy_version

    def discard_partial_update(self) -> None:
        """A sync attempt failed somewhere: drop what this worker received of it (the driver retries whole)."""
        self.engine.discard_partial_update()

    def incarnation(self) -> str:
        return self._incarnation

    def node(self) -> dict[str, str | None]:
        """The Ray node this worker runs on (rollout.devices.actor_node): where the driver expects it after a
        restart, and what it names when that node is lost."""
        from rollout.devices import actor_node

        return actor_node()

    def receive_weights(self, spec, rank: int, version: int) -> int:
        """Take part in one collective weight sync (group `spec`, this worker's `rank` in it): every bucket goes
        through the engine's update_weights (its WeightReceiver checks), then the update is completed. Returns
        the version now held."""
        import torch

        from rollout.weight_collective import GroupMember, receive_update

        if self._sync_member is None:
            self._sync_member = GroupMember()
        self.engine.discard_partial_update()  # a collective update always starts whole (an attempt may have failed)
        device = self.device if spec.backend == "nccl" else torch.device("cpu")  # NCCL: the worker's own GPU
        if device.type == "cpu" and spec.backend == "nccl":
            raise RuntimeError("weight sync: an NCCL group needs the rollout worker on a GPU (it computes on cpu)")
        receive_update(self._sync_member, spec, rank,
                       lambda entries, v: self.engine.update_weights(entries, v, final=False), device)
        self.engine.update_weights([], version, final=True)
        return self.engine.policy_version

    def receive_ipc_bucket(self, item: dict) -> None:
        """One bucket of a colocated CUDA IPC sync (rollout/weight_ipc.py); complete with update_weights({}, v)."""
        from rollout.weight_ipc import open_bucket, release_bucket

        version, entries = open_bucket(item)
        try:
            self.engine.update_weights(entries, version, final=False)
        finally:
            del entries
            release_bucket()

    def release(self) -> None:
        self.engine.release()

    def sleep(self) -> int:
        """Free the engine's weights and caches for a colocated learner's update; returns the bytes freed."""
        return self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def policy_version(self) -> int:
        return self.engine.policy_version

    def metrics(self) -> dict:
        """Metrics of the last generate call."""
        return dict(self._metrics)

    def placement(self) -> dict[str, object]:
        """Where this worker computes: its Ray node, the chosen device, the devices of the engine's weights and of
        a KV cache made the way the decoders make theirs (RaggedKVCache.for_model on the policy's device)."""
        from rollout.decoding.kv_cache import RaggedKVCache
        from rollout.devices import actor_node, assigned_gpu_ids, tensor_devices

        report: dict[str, object] = {"device": str(self.device), "gpu_ids": assigned_gpu_ids(), **actor_node()}
        policy = getattr(self.engine, "policy", None)
        if policy is not None:  # the torch engine
            cache = RaggedKVCache.for_model(policy.causal_lm.config, 1, 1, policy.dtype, policy.device)
            report.update(model=tensor_devices(policy.model), dtype=str(policy.dtype).removeprefix("torch."),
                          kv_cache=sorted({str(t.device) for t in cache.keys + cache.values}),
                          kv_cache_mode=self.engine.kv_cache)
        return report


def rollout_metrics(trajectories: Sequence[Trajectory], seconds: float, memory: dict | None = None) -> dict:
    """tokens/s, NFE, tokens per forward (per request: its tokens over the forwards it took), finish reasons, and
    the engine's `memory_metrics()` (how full its KV cache was)."""
    done = [t for t in trajectories if not t.finish_reason.startswith("error")]
    tokens = sum(t.response_length for t in done)
    metrics = {
        "rollout/seconds": seconds,
        "rollout/requests": len(trajectories),
        "rollout/completed": len(done),
        "rollout/response_tokens": tokens,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "rollout/nfe_mean": sum(t.nfe for t in done) / len(done) if done else 0.0,
        "rollout/tokens_per_forward": (sum(t.response_length / t.nfe for t in done if t.nfe) / len(done)
                                       if done else 0.0),
    }
    reasons = Counter("error" if t.finish_reason.startswith("error") else t.finish_reason for t in trajectories)
    metrics.update({f"rollout/finish/{reason}": count for reason, count in sorted(reasons.items())})
    metrics.update(memory or {})
    return metrics


# Per-request means among rollout_metrics: merged across workers weighted by each worker's completed requests;
# each worker's cache fill (a fraction of its own budget): the peak is the fullest worker's, the mean the workers'
# mean; every other rollout metric is a count, bytes, a duration or a rate of parallel workers, merged by summing.
PER_REQUEST_MEANS = ("rollout/nfe_mean", "rollout/tokens_per_forward")
PER_WORKER_MAX = ("rollout/cache_fill_peak",)
PER_WORKER_MEANS = ("rollout/cache_fill_mean",)


def merge_rollout_metrics(per_worker: Sequence[dict]) -> dict[str, float]:
    """One step's rollout metrics from each worker's `rollout_metrics`."""
    out: dict[str, float] = {}
    for m in per_worker:
        for key, value in m.items():
            if key in PER_WORKER_MAX:
                out[key] = max(out.get(key, 0.0), float(value))
                continue
            weight = float(m.get("rollout/completed", 1)) if key in PER_REQUEST_MEANS else 1.0
            out[key] = out.get(key, 0.0) + weight * float(value)
    completed = sum(float(m.get("rollout/completed", 1)) for m in per_worker)
    for key in PER_REQUEST_MEANS:
        if key in out:
            out[key] = out[key] / completed if completed else 0.0
    for key in PER_WORKER_MEANS:
        if key in out:
            out[key] = out[key] / sum(1 for m in per_worker if key in m)
    return out

