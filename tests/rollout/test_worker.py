"""RolloutWorker: plain-object use, metrics, the Ray actor (generate, streamed weight update, version), and the
driver's bounded weight pusher (rl.weight_sync.push_weights)."""
from __future__ import annotations

import pytest
import torch

from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.worker import RolloutWorker, merge_rollout_metrics, rollout_metrics

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


def test_workers_metrics_merge_per_request_means_by_request_count():
    # worker A: 3 requests at 2.0 tokens/forward, worker B: 1 request at 4.0 -> the pool's per-request mean is
    # (3 * 2 + 1 * 4) / 4 = 2.5 (an unweighted mean of the workers would say 3.0); counts and rates add up
    a = {"rollout/requests": 3, "rollout/completed": 3, "rollout/tokens_per_forward": 2.0, "rollout/nfe_mean": 8.0,
         "rollout/response_tokens": 48, "rollout/tokens_per_s": 10.0}
    b = {"rollout/requests": 2, "rollout/completed": 1, "rollout/tokens_per_forward": 4.0, "rollout/nfe_mean": 4.0,
         "rollout/response_tokens": 16, "rollout/tokens_per_s": 5.0}
    merged = merge_rollout_metrics([a, b])
    assert merged["rollout/tokens_per_forward"] == pytest.approx(2.5)
    assert merged["rollout/nfe_mean"] == pytest.approx(7.0)
    assert (merged["rollout/requests"], merged["rollout/completed"]) == (5, 4)
    assert (merged["rollout/response_tokens"], merged["rollout/tokens_per_s"]) == (64, 15.0)


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


class _SlowReceiver:
    """A rollout worker's update_weights contract, slow, recording when each chunk was applied."""

    def __init__(self):
        self.applied_at: list[float] = []

    def update_weights(self, weights, version: int, *, final: bool = True) -> int:
        import time

        if final:
            return version
        list(weights)  # resolves the chunk's object, as TorchEngine does
        time.sleep(0.05)
        self.applied_at.append(time.monotonic())
        return -1

    def applied(self) -> list[float]:
        return self.applied_at


@pytest.mark.ray
@pytest.mark.parametrize("max_inflight", [1, 2])
def test_the_drivers_weight_pusher_bounds_chunks_in_flight(local_ray, max_inflight):
    """rl.weight_sync.push_weights (what RolloutPool.sync sends with): when it takes chunk k from the learner, at
    least k - max_inflight chunks have been applied; an unbounded sender would take all 8 at once."""
    import time

    from rl.weight_sync import push_weights

    ray = local_ray
    receivers = [ray.remote(_SlowReceiver).options(num_cpus=0).remote() for _ in range(2)]
    taken_at = []

    def chunks():
        for k in range(8):
            taken_at.append(time.monotonic())
            yield ray.put((5, [(f"w{k}", torch.zeros(4))]))

    assert push_weights(chunks(), receivers, 5, max_inflight=max_inflight) == 8
    for receiver in receivers:
        applied = ray.get(receiver.applied.remote())
        assert len(applied) == len(taken_at) == 8
        for k, t in enumerate(taken_at):
            assert sum(a <= t for a in applied) >= k - max_inflight, (k, max_inflight)
    with pytest.raises(RuntimeError, match="reports version 5 after syncing 6"):
        push_weights(iter([ray.put((6, []))]), [ray.remote(_WrongVersion).options(num_cpus=0).remote()], 6)
    with pytest.raises(ValueError, match="max_inflight must be >= 1"):
        push_weights(iter([]), receivers, 6, max_inflight=0)


class _WrongVersion(_SlowReceiver):
    def update_weights(self, weights, version: int, *, final: bool = True) -> int:
        return 5
