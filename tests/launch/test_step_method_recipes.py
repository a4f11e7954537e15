"""The per-step methods' recipes say what their comments and the references' configs say."""
from __future__ import annotations

from pathlib import Path

from launch.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_agrpo_recipe_has_the_published_setup():
    r = load_recipe(RECIPES / "agrpo-llada-gsm8k.yaml")  # probablyabot/agrpo train.yaml
    assert (r.model.lora.r, r.model.lora.alpha, r.model.lora.dropout) == (64, 64, 0.0)
    assert (r.learner.lr, r.learner.betas, r.learner.weight_decay, r.learner.grad_clip, r.learner.mu,
            r.learner.schedule) == (5e-6, (0.9, 0.99), 0.01, 1.0, 1, "cosine")
    assert (r.rollout.max_tokens, r.rollout.block_size, r.rollout.steps, r.rollout.remasking, r.rollout.temperature,
            r.rollout.top_p, r.rollout.top_k, r.rollout.samples_per_prompt) == (384, 12, 128, "random", 0.6, 0.99,
                                                                                  150, 8)
    assert (r.algorithm.clip_eps_low, r.algorithm.beta, r.algorithm.logp_temperature) == (0.2, 0.0, "rollout")
    assert (r.estimator.name, r.estimator.mc_num, r.estimator.low_discrepancy, r.estimator.proposal) == \
        ("sampled_steps", 24, True, "entropy")


def test_mdpo_recipe_has_the_published_setup():
    r = load_recipe(RECIPES / "mdpo-llada-math.yaml")  # autonomousvision/mdpo config_demo.yaml
    assert r.model.lora is None
    assert (r.rollout.max_tokens, r.rollout.block_size, r.rollout.steps, r.rollout.temperature,
            r.rollout.samples_per_prompt, r.rollout.remasking) == (512, 512, 128, 0.1, 4, "low_confidence_static")
    assert (r.learner.lr, r.learner.mu, r.learner.schedule) == (1e-5, 1, "constant")
    assert (r.algorithm.name, r.algorithm.train_steps, r.algorithm.beta, r.algorithm.clip_eps_low) == \
        ("mdpo", 16, 0.0, 0.2)
    assert r.estimator.name == "intermediate_state"


def test_dtreerpo_recipe_has_the_published_setup():
    r = load_recipe(RECIPES / "dtreerpo-llada-gsm8k.yaml")  # THU-BPM/d-TreeRPO slurm_scripts/dtreerpo.yaml
    assert (r.model.lora.r, r.model.lora.alpha, r.model.lora.dropout) == (128, 64, 0.05)
    assert (r.learner.lr, r.learner.betas, r.learner.weight_decay, r.learner.grad_clip, r.learner.mu) == \
        (3e-5, (0.9, 0.99), 0.1, 0.2, 12)
    assert (r.rollout.max_tokens, r.rollout.block_size, r.rollout.steps, r.rollout.temperature) == (256, 32, 128, 0.9)
    a = r.algorithm
    assert (a.clip_eps_low, a.beta, a.kl_estimator, a.num_tree_samples, a.tree_branch_factor,
            a.tree_contraction_factor) == (0.4, 0.01, "k3", 4, 4, 2)
    assert r.rollout.samples_per_prompt == a.num_tree_samples * a.tree_branch_factor  # the tree's leaves


def test_tiny_recipes_use_the_methods():
    for name, algorithm, estimator in (("tiny-agrpo", "agrpo", "sampled_steps"),
                                       ("tiny-mdpo", "mdpo", "intermediate_state"),
                                       ("tiny-dtreerpo", "dtreerpo", "intermediate_state")):
        r = load_recipe(RECIPES / f"{name}.yaml")
        assert (r.algorithm.name, r.estimator.name) == (algorithm, estimator)


def test_a_tree_recipe_needs_one_sample_per_leaf_and_fixed_steps():
    import pytest

    with pytest.raises(ValueError, match="samples_per_prompt: 8, but the tree has 4 leaves"):
        load_recipe(RECIPES / "tiny-dtreerpo.yaml", ["rollout.samples_per_prompt=8"])
    with pytest.raises(ValueError, match="decides its own step count"):
        load_recipe(RECIPES / "tiny-dtreerpo.yaml", ["rollout.remasking=low_confidence_dynamic"])
