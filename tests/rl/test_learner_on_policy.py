"""Fused on-policy updates (LearnerConfig.fuse_on_policy_old_logp): with mu = 1 and one optimizer step per update,
pi_old's log-probs come from the training forward itself instead of a separate no-grad pass. The update must be
the very one the separate pass gives, bit for bit, with one scoring forward per sample fewer; everything that needs
pi_old before the first backward must keep the separate pass."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import rl.learner_scoring as scoring
from rl.learner import Learner, LearnerConfig, ValueConfig
from rl.optim import OptimConfig
from rollout.models.loading import load_policy
from tests.rl.test_learner import make_trajectories, weights

TIMING = {"time_s", "time_old_s", "forwards", "forwards_old"}


def _two_updates(model_dir, cfg: LearnerConfig):
    """Two updates (the second from the weights and optimizer state the first left) on fresh copies of one model."""
    policy = load_policy(model_dir)
    learner = Learner(policy, cfg)
    first = learner.update(make_trajectories(policy, 4, rollout_logp=True, prefix="a"))
    second = learner.update(make_trajectories(policy, 4, seed=1, rollout_logp=True, prefix="b"))
    return learner, weights(policy), first, second


# (algorithm, estimator, loss overrides): the trajectory estimator (TraceRL, its KL to the old policy), a reference
# KL (its separate pass stays), a random-mask ELBO estimator with observed_only off (EBPO: the masks are drawn from
# the same seed in the training forward), and CJ-GRPO's response token set, step-pooled normalisers, reference KL.
FUSABLE = [
    ("tracerl", "trajectory", {}),
    ("tracerl", "trajectory", {"beta": 0.05, "kl_reference": "ref"}),
    ("ebpo", "block_elbo", {}),
    ("cj_grpo", "trajectory", {}),
]


@pytest.mark.parametrize("algorithm,estimator,loss", FUSABLE)
def test_fused_update_is_the_separate_pass_update_bit_for_bit(tiny_model_dirs, algorithm, estimator, loss):
    base = LearnerConfig(algorithm=algorithm, estimator=estimator, loss=loss, mu=1, micro_batch_size=2,
                         optim=OptimConfig(lr=1e-3), fuse_on_policy_old_logp=False)
    fused_cfg = dataclasses.replace(base, fuse_on_policy_old_logp=True)
    sep, w_sep, *m_sep = _two_updates(tiny_model_dirs["block"], base)
    fus, w_fus, *m_fus = _two_updates(tiny_model_dirs["block"], fused_cfg)
    assert fus._fused and not sep._fused
    for k, v in w_sep.items():
        assert torch.equal(v, w_fus[k]), k
    for a, b in zip(m_sep, m_fus):
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
        assert a["ratio_min"] == a["ratio_max"] == 1.0  # on-policy: the separate pass equals the training forward
        assert b["forwards_old"] == 0 < a["forwards_old"]
        assert b["forwards"] == a["forwards"] - a["forwards_old"]  # exactly the old pass saved
        assert b["forwards_ref"] == a["forwards_ref"] and (a["forwards_ref"] > 0) == fus.need_ref
    if estimator == "trajectory":  # the mismatch (free: read off pi_old) after the training forwards recorded it
        assert m_fus[0]["logp_mismatch"] < 1e-5  # the rollout log-probs were exact


@pytest.mark.parametrize("change", [
    {"mu": 2},                                                   # the second inner iteration sees changed weights
    {"grad_accum": 1},                                           # two minibatches: two optimizer steps
    {"old_logp": "rollout"},                                     # pi_old is the behaviour policy's record
    {"value": ValueConfig(lr=1e-2)},                             # value targets before training
    {"algorithm": "diffu_grpo", "estimator": "one_step"},        # observed_only with a partial-mask estimator
    {"algorithm": "bgpo", "estimator": "mc_elbo"},               # per-draw backward needs each draw's old share
    {"fuse_on_policy_old_logp": False},
])
def test_separate_pass_kept_where_pi_old_is_needed_before_training(tiny_model_dirs, change):
    policy = load_policy(tiny_model_dirs["block"])
    cfg = dataclasses.replace(LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, micro_batch_size=2,
                                            optim=OptimConfig(lr=1e-4)), **change)
    learner = Learner(policy, cfg)
    m = learner.update(make_trajectories(policy, 4))
    assert not learner._fused and m["forwards_old"] > 0


def test_an_estimator_that_scores_a_subset_is_refused_not_mis_normalised(tiny_model_dirs, monkeypatch):
    """Were an estimator wrongly listed as scoring every token, the normalisers computed ahead would be wrong: the
    training forward checks the tokens it scored and stops with a one-line error instead."""
    monkeypatch.setattr(scoring, "FULLY_OBSERVED_ESTIMATORS", (*scoring.FULLY_OBSERVED_ESTIMATORS, "random_mask"))
    policy = load_policy(tiny_model_dirs["block"])
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="random_mask", mu=1, micro_batch_size=2,
                                            optim=OptimConfig(lr=1e-4)))
    with pytest.raises(RuntimeError, match="left valid tokens unscored; set learner.fuse_on_policy_old_logp: false"):
        learner.update(make_trajectories(policy, 4))
