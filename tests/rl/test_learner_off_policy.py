"""pi_old from the behaviour policy: the rollout's recorded log-probs give the true importance ratio."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rollout.models.loading import load_policy

_spec = importlib.util.spec_from_file_location("learner_tests", Path(__file__).with_name("test_learner.py"))
learner_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learner_tests)


def _config(old_logp: str) -> LearnerConfig:
    return LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, micro_batch_size=4, log_mismatch=True,
                         loss={"beta": 0.0, "clip_eps_low": 10.0, "clip_eps_high": 10.0}, old_logp=old_logp,
                         optim=OptimConfig(lr=1e-4))


def test_behaviour_log_probs_set_the_ratio(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    trajs = learner_tests.make_trajectories(policy, 4, rollout_logp=True)
    for s in trajs:
        s.trajectory.logprobs = s.trajectory.logprobs - 0.25  # an older policy gave every token e^-0.25 times the probability
    behaviour = Learner(policy, _config("rollout")).update(trajs)
    # ratio = pi_theta / pi_behaviour = e^0.25 on every counted token (clip wide open, no KL)
    assert behaviour["ratio_mean"] == pytest.approx(float(torch.exp(torch.tensor(0.25))), rel=1e-4)
    assert behaviour["ratio_min"] == pytest.approx(behaviour["ratio_max"], rel=1e-4)
    assert behaviour["logp_mismatch"] == pytest.approx(0.25, rel=1e-4)


def test_recompute_ignores_the_behaviour_policy(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    trajs = learner_tests.make_trajectories(policy, 4, rollout_logp=True)
    for s in trajs:
        s.trajectory.logprobs = s.trajectory.logprobs - 0.25
    recompute = Learner(policy, _config("recompute")).update(trajs)
    assert recompute["ratio_mean"] == 1.0


def test_behaviour_needs_the_trajectory_estimator(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    with pytest.raises(ValueError, match="old_logp"):
        Learner(policy, LearnerConfig(algorithm="diffu_grpo", estimator="one_step", old_logp="rollout"))
