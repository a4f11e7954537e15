"""Reference re-sync (learner.ref_sync_steps / ref_sync_alpha; TRL's SyncRefModelCallback as ESPO, IGPO and
d-TreeRPO configure it): after every N-th optimizer step ref <- alpha policy + (1 - alpha) ref, not before; a resume
on either side of the boundary continues bit for bit; refused where there is no separate reference."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.reference import check_ref_sync
from tests.rl.test_igpo import hinted_samples


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    from rollout.models.loading import load_policy

    path = tiny_model_dirs["llada"]
    samples = hinted_samples(load_policy(path, block_size=4))
    return path, samples


def make_learner(path, alpha):
    from rollout.models.loading import load_policy

    policy = load_policy(path, block_size=4)
    return Learner(policy, LearnerConfig(algorithm="diffu_grpo", estimator="one_step", estimator_params={"p_mask": 0},
                                         mu=1, micro_batch_size=3, optim=OptimConfig(lr=1e-3), ref_sync_steps=2,
                                         ref_sync_alpha=alpha))


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_reference_follows_the_policy_every_n_steps(setup, alpha):
    path, samples = setup
    learner = make_learner(path, alpha)
    ref0 = weights(learner.ref_policy.model)
    learner.update(samples)  # optimizer step 1: no sync
    assert learner.optimizer_steps == 1 and learner.ref_syncs == 0
    assert all(torch.equal(v, ref0[k]) for k, v in weights(learner.ref_policy.model).items())
    pol1 = weights(learner.policy.model)
    assert any(not torch.equal(v, ref0[k]) for k, v in pol1.items())
    learner.update(samples)  # step 2: sync
    assert learner.ref_syncs == 1
    pol2, ref2 = weights(learner.policy.model), weights(learner.ref_policy.model)
    for k, v in ref2.items():
        want = pol2[k] if alpha == 1.0 else alpha * pol2[k] + (1 - alpha) * ref0[k]
        if alpha == 1.0:
            assert torch.equal(v, want), k
        else:
            torch.testing.assert_close(v, want, rtol=0, atol=1e-7, msg=k)
    m = learner.update(samples)  # step 3: the new reference is the KL target (alpha 1: the policy itself), no sync
    assert learner.ref_syncs == 1 and (m["kl"] == 0.0) == (alpha == 1.0)
    assert all(torch.equal(v, ref2[k]) for k, v in weights(learner.ref_policy.model).items())


@pytest.mark.parametrize("resume_after", [1, 2])
def test_resume_across_the_boundary_is_bitwise(setup, resume_after):
    """Resume after step 1 (reference still the initial one: not saved) or step 2 (re-synced: saved and restored),
    then run to step 4 (a second sync): policy and reference equal the uninterrupted run's bit for bit."""
    path, samples = setup
    straight = make_learner(path, 0.6)
    saved = None
    for step in range(1, 5):
        straight.update(samples)
        if step == resume_after:
            # deep copy: the optimizer's state tensors in state_dict() are live (a checkpoint torch.saves them at once)
            saved = (weights(straight.policy.model), copy.deepcopy(straight.state_dict()))
    assert ("reference" in saved[1]) == (resume_after >= 2)
    resumed = make_learner(path, 0.6)  # the initial policy and reference, as a resume builds them
    with torch.no_grad():
        for k, p in resumed.policy.model.named_parameters():
            p.copy_(saved[0][k])
    resumed.load_state_dict(saved[1])
    for _ in range(resume_after, 4):
        resumed.update(samples)
    assert straight.ref_syncs == resumed.ref_syncs == 2
    for a, b in ((straight.policy.model, resumed.policy.model), (straight.ref_policy.model, resumed.ref_policy.model)):
        wb = weights(b)
        assert all(torch.equal(v, wb[k]) for k, v in weights(a).items())


def test_refused_without_a_separate_reference():
    base = LearnerConfig(ref_sync_steps=64)
    with pytest.raises(ValueError, match="LoRA policy's reference is its own base"):
        check_ref_sync(base, None, True, None)
    with pytest.raises(ValueError, match="no reference model"):
        check_ref_sync(base, None, False, None)
    with pytest.raises(ValueError, match="0 < alpha <= 1"):
        check_ref_sync(LearnerConfig(ref_sync_steps=2, ref_sync_alpha=0.0), object(), False, None)
    check_ref_sync(LearnerConfig(), None, True, None)  # off: nothing to check


def test_recipe_rules():
    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    root = Path(__file__).resolve().parents[2] / "recipes"
    recipe = load_recipe(root / "tiny-espo.yaml", overrides=["learner.ref_sync_steps=64"])
    assert recipe.learner.ref_sync_steps == 64 and recipe.learner.ref_sync_alpha == 0.6
    with pytest.raises(RecipeError, match="learner.ref_sync_steps: 64, but the run has no reference"):
        load_recipe(root / "tiny-bgpo.yaml", overrides=["learner.ref_sync_steps=64"])
    with pytest.raises(RecipeError, match="LoRA run's reference is its base"):
        load_recipe(root / "igpo-llada-math.yaml", overrides=["learner.ref_sync_steps=64"])


def test_skipped_step_never_syncs(setup, monkeypatch):
    """A non-finite step is skipped (no optimizer step): it must not count toward, nor trigger, a re-sync, even when
    the applied-step count already sits on a sync boundary."""
    from rl.learner_batch import StepTally

    path, _ = setup
    learner = make_learner(path, 0.6)
    ref0 = weights(learner.ref_policy.model)
    learner.optimizer_steps = 2  # on the boundary of ref_sync_steps=2, already synced there
    monkeypatch.setattr(learner.backend, "step", lambda t: (float("nan"), False, 0.0))
    learner._optimizer_step(StepTally())
    assert learner.optimizer_steps == 2 and learner.ref_syncs == 0
    assert all(torch.equal(v, ref0[k]) for k, v in weights(learner.ref_policy.model).items())
    monkeypatch.setattr(learner.backend, "step", lambda t: (1.0, True, 0.0))
    learner._optimizer_step(StepTally())  # step 3: no sync
    assert learner.ref_syncs == 0
    learner._optimizer_step(StepTally())  # step 4: sync
    assert learner.optimizer_steps == 4 and learner.ref_syncs == 1


def test_resume_restores_the_saved_reference_not_the_initial_one(setup):
    """The state of a re-synced run carries the reference; loading it replaces the fresh learner's (initial)
    reference bit for bit, and a state whose reference was never synced leaves it alone."""
    path, samples = setup
    run = make_learner(path, 1.0)
    run.update(samples)
    run.update(samples)  # synced: reference = policy after step 2
    state = copy.deepcopy(run.state_dict())
    fresh = make_learner(path, 1.0)
    initial = weights(fresh.ref_policy.model)
    assert any(not torch.equal(v, initial[k]) for k, v in weights(run.ref_policy.model).items())
    fresh.load_state_dict(state)
    assert fresh.ref_syncs == 1
    want = weights(run.ref_policy.model)
    assert all(torch.equal(v, want[k]) for k, v in weights(fresh.ref_policy.model).items())


@pytest.mark.parametrize("steps,alpha", [(-1, 0.6), (2, 0.0), (2, -0.5), (2, 1.5)])
def test_out_of_range_values_refused(steps, alpha):
    with pytest.raises(ValueError, match="ref_sync_steps / ref_sync_alpha"):
        check_ref_sync(LearnerConfig(ref_sync_steps=steps, ref_sync_alpha=alpha), object(), False, None)


@pytest.mark.parametrize("override,field", [("learner.ref_sync_steps=-1", "learner.ref_sync_steps"),
                                            ("learner.ref_sync_alpha=0", "learner.ref_sync_alpha"),
                                            ("learner.ref_sync_alpha=1.5", "learner.ref_sync_alpha")])
def test_recipe_out_of_range_is_a_one_line_error_naming_the_field(override, field):
    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    root = Path(__file__).resolve().parents[2] / "recipes"
    with pytest.raises(RecipeError) as err:
        load_recipe(root / "tiny-espo.yaml", overrides=[override])
    assert field in str(err.value) and "\n" not in str(err.value)


def test_recipe_refuses_sync_under_zero3():
    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    root = Path(__file__).resolve().parents[2] / "recipes"
    with pytest.raises(RecipeError, match="ref_sync_steps: not built for ZeRO-3"):
        load_recipe(root / "tiny-espo.yaml", overrides=["learner.ref_sync_steps=64", "learner.backend=deepspeed",
                                                        "learner.zero_stage=3"])
