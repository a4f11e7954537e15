"""learner.offload_optimizer: DeepSpeed ZeRO-Offload really holds the optimizer on the host, and the step it takes
there is the same step (one rank, CPU: the weights after one update are bitwise those of the plain ZeRO run)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rollout.models.loading import load_policy

pytest.importorskip("deepspeed")
_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


@pytest.fixture
def world_of_one(monkeypatch):
    """DeepSpeedBackend joins a world of one on loopback: its environment variables and process group go again
    afterwards (Ray clusters started later in this process would hand them to their actors)."""
    import torch.distributed as dist

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    had_group = dist.is_initialized()
    yield
    if not had_group and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2])
def test_offloaded_optimizer_takes_the_same_step(tiny_model_dirs, zero_stage, world_of_one):
    path = tiny_model_dirs["block"]
    initial = {k: v.detach().clone() for k, v in load_policy(path).causal_lm.named_parameters()}
    weights, offloaded = {}, {}
    for offload in (False, True):
        policy = load_policy(path)
        config = LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, micro_batch_size=1, grad_accum=2,
                               optim=OptimConfig(lr=1e-2), seed=3, backend="deepspeed", zero_stage=zero_stage,
                               offload_optimizer=offload)
        learner = Learner(policy, config)
        metrics = learner.update(_helpers.make_trajectories(policy, 4))
        assert metrics["optimizer_steps"] == 2 and metrics["nan_skipped"] == 0
        offloaded[offload] = bool(learner.backend.optimizer.cpu_offload)
        weights[offload] = {k: v.detach().clone() for k, v in policy.causal_lm.named_parameters()}
    assert offloaded == {False: False, True: True}
    assert any(not torch.equal(weights[True][k], initial[k]) for k in initial)  # the step did something
    for name in initial:
        assert torch.equal(weights[True][name], weights[False][name]), name
