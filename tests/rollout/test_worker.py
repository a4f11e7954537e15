"""RolloutWorker: plain-object use, metrics, and the Ray actor (generate, streamed weight update, version)."""
from __future__ import annotations

import os

import pytest
import torch

from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.worker import RolloutWorker, rollout_metrics

PARAMS = SamplingParams(temperature=1.0, max_tokens=8)


def _requests(n=3):
    return [GenerationRequest(torch.arange(10, 14 + i), PARAMS, seed=i, request_id=f"r{i}") for i in range(n)]


def test_worker_without_ray_reports_metrics(tiny_model_dirs):
    worker = RolloutWorker(tiny_model_dirs["block"])
    out = worker.generate(_requests() + [GenerationRequest([], PARAMS)])
    metrics = worker.metrics()
    assert metrics["rollout/requests"] == 4 and metrics["rollout/finish/error"] == 1
    assert metrics["rollout/response_tokens"] == sum(t.response_length for t in out)
    assert metrics["rollout/tokens_per_s"] > 0 and metrics["rollout/nfe_mean"] > 0
    assert metrics["rollout/tokens_per_forward"] == pytest.approx(1.0)  # random weights: one token a step


def test_metrics_of_an_empty_call():
    assert rollout_metrics([], 0.0)["rollout/tokens_per_s"] == 0.0


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_worker_generates_and_takes_new_weights(local_ray, tiny_model_dirs, tmp_path):
    ray = local_ray
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(str(tiny_model_dirs["block"]))  # as the driver does
    assert ray.get(worker.ready.remote())
    before = ray.get(worker.generate.remote(_requests()))
    assert all(t.policy_version == 0 and t.response_length > 0 for t in before)

    new = load_policy(make_tiny_policy("block", tmp_path / "new", seed=11)).causal_lm.state_dict()
    names = list(new)
    half = len(names) // 2
    # Streamed in two buckets, one Ray call each; the version applies with the final one.
    ray.get(worker.update_weights.remote({n: new[n] for n in names[:half]}, 3, final=False))
    assert ray.get(worker.policy_version.remote()) == 0
    assert ray.get(worker.update_weights.remote({n: new[n] for n in names[half:]}, 3)) == 3

    after = ray.get(worker.generate.remote(_requests()))
    assert all(t.policy_version == 3 for t in after)
    assert any(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(before, after))
    metrics = ray.get(worker.metrics.remote())
    assert metrics["rollout/requests"] == 3
    ray.get(worker.release.remote())
    ray.kill(worker)
