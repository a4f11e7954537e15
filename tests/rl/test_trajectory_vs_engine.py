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


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=1.3, max_tokens=12, remasking="low_confidence_static", steps_per_block=2,
                   stop_at_eos=False),
    SamplingParams(temperature=1.0, max_tokens=12, remasking="low_confidence_dynamic", threshold=0.05,
                   stop_at_eos=False),
], ids=["static", "dynamic"])
def test_absolute_aligned_rollouts_are_recomputed_for_every_prompt_length(tiny_policies, sampling):
    """An SDAR/TraDo model (blocks from the sequence start): the first decoding block holds the prompt's tail.
    The estimator's default layout (the model's alignment) reproduces every recorded log-prob; TraceRL's own
    layout (`block_alignment="response"`) does only when the prompt length is a multiple of the block size."""
    policy = tiny_policies["sdar"]
    assert policy.spec.block_alignment == "absolute"
    bs = policy.spec.block_size
    g = torch.Generator().manual_seed(1)
    lengths = range(1, 2 * bs + 2)
    requests = [GenerationRequest(torch.randint(10, 90, (n,), generator=g), sampling, seed=n, request_id=f"p{n}")
                for n in lengths]
    trajectories = TorchEngine(policy).generate(requests)
    inp = EstimatorInput([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
                         [t.request_id for t in trajectories], [t.response_length for t in trajectories],
                         [t.step_map for t in trajectories], bs)
    estimator = get_estimator("trajectory")
    with torch.no_grad():
        own = estimator(policy, inp, temperature=sampling.temperature)
        tracerl = estimator(policy, inp, temperature=sampling.temperature, block_alignment="response")
    for b, t in enumerate(trajectories):
        n = t.response_length
        assert n == sampling.max_tokens - t.prompt_ids.numel() % bs  # whole canvas blocks within max_tokens
        recorded = t.logprobs.to(own.token_logp)
        assert torch.allclose(own.token_logp[b, :n], recorded, atol=1e-4), (t.prompt_ids.numel(), b)
        gap = (tracerl.token_logp[b, :n] - recorded).abs().max().item()
        if t.prompt_ids.numel() % bs == 0:
            assert gap <= 1e-4
        else:
            assert gap > 1e-2, (t.prompt_ids.numel(), gap)
    assert own.forwards <= max(int(t.block_local_steps().max()) + 1 for t in trajectories)
