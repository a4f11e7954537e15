"""SDAR-MoE through the learner: the rollout's recorded log-probs are recomputed within 1e-5, TraceRL trains the
weights, and the trained policy saves back in SDAR-MoE's own format with identical logits after reloading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy, save_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams

SIZE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16)
ROLLOUT = SamplingParams(temperature=1.3, max_tokens=12, remasking="low_confidence_dynamic", threshold=0.05,
                         stop_at_eos=False)
PROMPT_LENGTHS = (3, 5, 6, 8, 9, 11)  # every prompt length mod the block of 4


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_policy("sdar-moe", tmp_path_factory.mktemp("moe_learner") / "m", seed=6, **SIZE)


def _rollouts(policy):
    g = torch.Generator().manual_seed(0)
    requests = [GenerationRequest(torch.randint(10, 90, (n,), generator=g), ROLLOUT, seed=i, request_id=f"q{i}")
                for i, n in enumerate(PROMPT_LENGTHS)]
    return TorchEngine(policy, kv_cache="block").generate(requests)


def test_learner_recomputes_rollout_log_probs_and_trains(moe_dir, tmp_path):
    policy = load_policy(moe_dir)
    trajectories = _rollouts(policy)
    assert len(trajectories) == len(PROMPT_LENGTHS)
    # 1. the trajectory estimator, through the training layout, gives back every recorded log-prob
    inp = EstimatorInput([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
                         [t.request_id for t in trajectories], [t.response_length for t in trajectories],
                         [t.step_map for t in trajectories], trajectories[0].block_size)
    with torch.no_grad():
        est = get_estimator("trajectory")(policy, inp, temperature=ROLLOUT.temperature, shrink=1)
    worst = max((est.token_logp[b, :t.response_length] - t.logprobs).abs().max().item()
                for b, t in enumerate(trajectories))
    assert worst <= 1e-5, worst
    # 2. the learner's own check of the same (pi_old recomputed vs the rollout's), then a TraceRL update
    samples = [ScoredSample(t, advantage=a, reward=float(a > 0))
               for t, a in zip(trajectories, (1.0, -1.0, 0.5, -0.5, 1.0, -1.0))]
    before = {n: p.detach().clone() for n, p in policy.causal_lm.named_parameters()}
    config = LearnerConfig(algorithm="tracerl", estimator="trajectory", micro_batch_size=3, log_mismatch=True,
                           temperature=ROLLOUT.temperature, loss={"logp_temperature": "rollout"},
                           optim=OptimConfig(lr=1e-3))
    metrics = Learner(policy, config).update(samples)
    assert metrics["logp_mismatch_max"] <= 1e-5, metrics["logp_mismatch_max"]
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and metrics["clipfrac"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
    changed = {n for n, p in policy.causal_lm.named_parameters() if not torch.equal(p, before[n])}
    assert any(".mlp.experts." in n for n in changed) and any(n.endswith(".mlp.gate.weight") for n in changed)
    # 3. the trained policy saves in SDAR-MoE's names and reloads to identical logits
    out = save_policy(policy, tmp_path / "trained")
    assert json.loads((out / "config.json").read_text())["model_type"] == "sdar_moe"
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(load_file(str(moe_dir / "model.safetensors")))
    again = load_policy(out)
    with torch.no_grad():
        a = get_estimator("trajectory")(policy, inp, shrink=1).token_logp
        b = get_estimator("trajectory")(again, inp, shrink=1).token_logp
    assert torch.equal(a, b)
