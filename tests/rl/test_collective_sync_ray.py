"""Weight sync through the gloo group between a learner (LearnerGroup actors) and two RolloutWorker actors, as the
driver's RolloutPool sends it: weights bitwise equal after sync for the torch backend, LoRA deltas, and ZeRO-3
with 2 learner ranks; a worker Ray restarted between syncs rejoins through a new group."""
from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch

from rl.learner import LearnerConfig
from rl.optim import OptimConfig
from rollout.models.loading import load_policy

_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


def _lora_policy(path, device=None):
    from rollout.models.lora import apply_lora

    return apply_lora(load_policy(path, device=device or "cpu"), r=4, alpha=8, seed=0)


def _pool(workers, *, lora: bool):
    from launch.driver_roles import RolloutPool, sync_options

    return RolloutPool.of_workers(workers, transport="collective", sync_options=sync_options(lora=lora, engine="torch"))


def _weights(ray, worker) -> dict[str, torch.Tensor]:
    return ray.get(worker.__ray_call__.remote(
        lambda self: {k: v.detach().clone() for k, v in self.engine.policy.causal_lm.named_parameters()}))


@pytest.mark.slow  # 12-45 s each on 2 shared cores, by load (actor start-up dominates)
@pytest.mark.ray
@pytest.mark.parametrize("case", ["torch", "lora", "zero3"])
def test_learner_to_two_rollout_actors_bitwise(local_ray, tiny_model_dirs, case):
    ray = local_ray
    from rl.learner_worker import LearnerGroup
    from rollout.worker import RolloutWorker

    path = tiny_model_dirs["block"]
    lora = case == "lora"
    config = LearnerConfig(mu=1, optim=OptimConfig(lr=1e-2), seed=3,
                           **({"backend": "deepspeed", "zero_stage": 3} if case == "zero3" else {}))
    group = LearnerGroup(partial(_lora_policy if lora else load_policy, path), config,
                         num_workers=2 if case == "zero3" else 1, num_cpus_per_worker=0.25)
    workers = [ray.remote(RolloutWorker).options(num_cpus=0.25, max_restarts=1).remote(str(path))
               for _ in range(2)]
    try:
        pool = _pool(workers, lora=lora)
        initial = load_policy(path).causal_lm.state_dict()
        for version in (1, 2):
            group.update(_helpers.make_trajectories(load_policy(path), 2, prefix=f"v{version}"))
            if version == 2 and case == "torch":  # a worker Ray restarts between syncs: a new group forms
                ray.kill(workers[1], no_restart=False)
                pool._wait_ready(1)
            pool.sync(group, version)
            want = group.policy_state()  # merged full weights, gathered from the ZeRO-3 partitions
            assert any(not torch.equal(want[n], initial[n]) for n in want)
            for w in workers:
                assert ray.get(w.policy_version.remote()) == version
                got = _weights(ray, w)
                assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), case
        metrics = group.update(_helpers.make_trajectories(load_policy(path), 2, prefix="m"))
        assert metrics["weight_sync_bytes"] > 0 and metrics["weight_sync_peak_buffers"] <= 2
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w, no_restart=True)
