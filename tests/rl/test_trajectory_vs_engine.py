"""The learner's trajectory log-probs equal the rollout engine's recorded ones for the same weights.

Real trajectories from the cached block decoder and the full-attention decoder (sampled at temperature 1.3, static
and dynamic remasking), scored by the trajectory estimator through the training layout: one forward per step of
a block for every block at once, versus the decoder's per-block cached forwards.
"""
from __future__ import annotations

import pytest
import torch

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rollout.engine import TorchEngine
from rollout.sampling import GenerationRequest, SamplingParams

CASES = [
    ("block", SamplingParams(temperature=1.3, max_tokens=16, remasking="low_confidence_static", steps_per_block=2,
                             stop_at_eos=False)),
    ("sdar", SamplingParams(temperature=1.3, max_tokens=16, remasking="low_confidence_dynamic", threshold=0.05,
                            stop_at_eos=False)),
    ("llada", SamplingParams(temperature=1.3, max_tokens=32, remasking="low_confidence_static", steps_per_block=8,
                             stop_at_eos=False)),
]


@pytest.mark.parametrize("kind, sampling", CASES, ids=[c[0] for c in CASES])
def test_trajectory_estimator_reproduces_recorded_rollout_log_probs(tiny_policies, kind, sampling):
    policy = tiny_policies[kind]
    engine = TorchEngine(policy)
    g = torch.Generator().manual_seed(0)
    requests = [GenerationRequest(torch.randint(10, 90, (n,), generator=g), sampling, seed=i, request_id=f"q{i}")
                for i, n in enumerate((3, 7, 5))]
    trajectories = engine.generate(requests)
    assert all(t.finish_reason in ("eos", "length") for t in trajectories)
    inp = EstimatorInput([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
                         [t.request_id for t in trajectories], [t.response_length for t in trajectories],
                         [t.step_map for t in trajectories], trajectories[0].block_size)
    shrink = 1
    with torch.no_grad():
        est = get_estimator("trajectory")(policy, inp, temperature=sampling.temperature, shrink=shrink)
    for b, t in enumerate(trajectories):
        n = t.response_length
        assert torch.allclose(est.token_logp[b, :n], t.logprobs.to(est.token_logp), atol=1e-4), (
            (est.token_logp[b, :n] - t.logprobs).abs().max())
    if policy.spec.is_block:
        assert est.forwards <= max(int(t.block_local_steps().max()) + 1 for t in trajectories)
