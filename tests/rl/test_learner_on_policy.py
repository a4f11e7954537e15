"""pi_old from the training forward (LearnerConfig.fuse_on_policy_old_logp): samples trained before an update's
first optimizer step (all of them with mu = 1 and one minibatch) take pi_old's log-probs from their training forward
instead of a separate no-grad pass. The update must be the very one the separate pass gives, bit for bit, with one
scoring forward per such sample fewer; everything that needs pi_old before the first backward keeps the pass."""
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


# (algorithm, estimator, learner overrides, loss overrides, samples fused, old pass left): the trajectory
# estimator (TraceRL, its KL to the old policy) on-policy, with a reference KL (its separate pass stays), with two minibatches (the first
# fused), with two inner iterations (the second reuses the first's pi_old: deterministic masks); a random-mask ELBO
# estimator with observed_only off (EBPO: the training forward draws the old pass's masks), also reseeded per inner
# iteration (the second iteration's masks need their own old pass); CJ-GRPO's response token set, step-pooled
# normalisers and reference KL.
CASES = [
    ("tracerl", "trajectory", {}, {}, 4, False),
    ("tracerl", "trajectory", {}, {"beta": 0.05, "kl_reference": "ref"}, 4, False),
    ("tracerl", "trajectory", {"grad_accum": 1}, {}, 2, True),
    ("tracerl", "trajectory", {"mu": 2}, {}, 4, False),
    ("ebpo", "block_elbo", {}, {}, 4, False),
    ("ebpo", "block_elbo", {"mu": 2, "reseed_per_inner": True}, {}, 4, True),
    ("cj_grpo", "trajectory", {}, {}, 4, False),
]


@pytest.mark.parametrize("algorithm,estimator,learner,loss,fused,left", CASES)
def test_fused_update_is_the_separate_pass_update_bit_for_bit(tiny_model_dirs, algorithm, estimator, learner, loss,
                                                              fused, left):
    base = LearnerConfig(algorithm=algorithm, estimator=estimator, loss=loss, micro_batch_size=2,
                         optim=OptimConfig(lr=1e-3), fuse_on_policy_old_logp=False, **{"mu": 1, **learner})
    fused_cfg = dataclasses.replace(base, fuse_on_policy_old_logp=True)
    sep, w_sep, *m_sep = _two_updates(tiny_model_dirs["block"], base)
    fus, w_fus, *m_fus = _two_updates(tiny_model_dirs["block"], fused_cfg)
    assert len(fus._fused) == fused and not sep._fused
    for k, v in w_sep.items():
        assert torch.equal(v, w_fus[k]), k
    for a, b in zip(m_sep, m_fus):
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
        assert a["ratio_min"] == a["ratio_max"] == 1.0 or a["optimizer_steps"] > 1  # the first step is on-policy
        saved = a["forwards_old"] - b["forwards_old"]
        assert saved > 0 and b["forwards"] == a["forwards"] - saved  # only old-pass forwards are saved
        assert (b["forwards_old"] > 0) == left
        assert b["forwards_ref"] == a["forwards_ref"] and (a["forwards_ref"] > 0) == fus.need_ref
    if estimator == "trajectory":  # the mismatch (free: read off pi_old) after the training forwards recorded it
        assert m_fus[0]["logp_mismatch"] < 1e-5  # the rollout log-probs were exact


@pytest.mark.parametrize("change", [
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
    m = learner.update(make_trajectories(policy, 4, rollout_logp=True))
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
