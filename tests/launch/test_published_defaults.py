"""rl/published.py is the one source of each algorithm's published defaults and of the reference-model rule: the
loss registry, the recipe sections, the derived recipe defaults and every recipe in recipes/ agree with it."""
from __future__ import annotations

import typing
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import pytest

from launch.recipe import Recipe, load_recipe, recipe_from_dict
from launch.recipe_rules import PREFERENCE_ALGORITHMS
from launch.recipe_sections import TraceRLFilter, ValueModelSection
from rl.algorithms import LOSSES, LossConfig, make_loss_config
from rl.published import ALGORITHM_DEFAULTS, GENERIC, needs_reference_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALGORITHMS = sorted(ALGORITHM_DEFAULTS)
SECTIONS = {typing.get_args(m.model_fields["name"].annotation)[0]: m
            for m in typing.get_args(Recipe.model_fields["algorithm"].annotation)}


def _minimal(algorithm: str, **extra) -> Recipe:
    data = {"task": "arithmetic"}
    if algorithm in PREFERENCE_ALGORITHMS:  # trained offline from stored pairs
        data, extra = {"trajectories": "runs/x"}, {"trainer": {"mode": "offline"}, **extra}
    return recipe_from_dict({"name": "t", "model": {"tiny": "llada"}, "algorithm": algorithm, "reward": "math",
                             "data": data, "rollout": {"max_tokens": 16}, **extra})


def test_every_recipe_algorithm_has_an_entry_and_a_registered_loss():
    assert set(SECTIONS) == set(ALGORITHM_DEFAULTS)
    assert set(ALGORITHM_DEFAULTS) <= set(LOSSES.names())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_registry_entry_is_the_table(algorithm):
    assert LOSSES.defaults(algorithm) == dict(ALGORITHM_DEFAULTS[algorithm].loss)
    assert set(ALGORITHM_DEFAULTS[algorithm].loss) <= {f.name for f in fields(LossConfig)}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_recipe_section_defaults_are_the_table(algorithm):
    entry, section = ALGORITHM_DEFAULTS[algorithm], SECTIONS[algorithm]()
    for part in ("loss", "group"):
        for key, value in getattr(entry, part).items():
            if key in ("accuracy_lo", "accuracy_hi"):
                assert getattr(section.filter, key) == value, (algorithm, key)
            elif key in type(section).model_fields:
                assert getattr(section, key) == value, (algorithm, key)
    # The section's loss parameters, merged over the registry entry, change nothing: both say the same.
    assert make_loss_config(algorithm, **section.loss_params()) == make_loss_config(algorithm)


def test_tracerl_filter_and_value_model_defaults_are_the_table():
    group, value = ALGORITHM_DEFAULTS["tracerl"].group, ALGORITHM_DEFAULTS["tracerl"].value_model
    assert (TraceRLFilter().accuracy_lo, TraceRLFilter().accuracy_hi) == (group["accuracy_lo"], group["accuracy_hi"])
    assert {k: getattr(ValueModelSection(), k) for k in value} == dict(value)
    # a recipe setting one bound keeps the other published one
    assert recipe_from_dict({"name": "t", "model": {"tiny": "sdar"}, "algorithm": {
        "name": "tracerl", "filter": {"accuracy_lo": 0.1}}, "reward": "math", "data": {"task": "arithmetic"},
        "rollout": {"max_tokens": 16}}).algorithm.filter.accuracy_hi == group["accuracy_hi"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_left_unset_learner_and_rollout_values_become_published_then_generic(algorithm):
    # JustGRPO's exact AR estimator scores left-to-right rollouts only (recipe rule)
    remasking = "left_to_right" if algorithm == "justgrpo" else "random"
    recipe = _minimal(algorithm, rollout={"max_tokens": 16, "remasking": remasking})
    entry = ALGORITHM_DEFAULTS[algorithm]
    for section in ("learner", "rollout"):
        for key, generic in GENERIC[section].items():
            want = getattr(entry, section).get(key, generic)
            got = getattr(getattr(recipe, section), key)
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == want, (algorithm, section, key)


def test_published_values_differ_from_generic_somewhere():
    # Guards the test above against a table that silently equals GENERIC (it would then prove nothing).
    assert _minimal("diffu_grpo").learner.lr == 3e-6 != GENERIC["learner"]["lr"]
    assert _minimal("tracerl").rollout.samples_per_prompt == 16 != GENERIC["rollout"]["samples_per_prompt"]


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipes_agree_with_the_table(name):
    """Published recipes (not tiny-*) keep every published value; tiny ones use toy sizes (lr, mu, G, filters
    for toy groups) but the published loss."""
    recipe = load_recipe(RECIPES / name)
    entry = ALGORITHM_DEFAULTS[recipe.algorithm.name]
    params = recipe.algorithm.loss_params()
    for key, value in entry.loss.items():
        if key in params:
            assert params[key] == value, (name, key)
    if not name.startswith("tiny-"):
        if entry.group:  # group-relative methods (preference methods have no groups)
            assert recipe.algorithm.advantage == entry.group["advantage"], name
            for key in ("accuracy_lo", "accuracy_hi"):
                assert getattr(recipe.algorithm.filter, key) == entry.group[key], (name, key)
            assert recipe.algorithm.length_limit_margin == entry.group["length_limit_margin"], name
        for section in ("learner", "rollout"):
            for key, value in getattr(entry, section).items():
                got = getattr(getattr(recipe, section), key)
                assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, (name, section, key)
        value_model = getattr(recipe.algorithm, "value_model", None)
        if value_model is not None:
            assert {k: getattr(value_model, k) for k in entry.value_model} == dict(entry.value_model), name


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_reference_model_follows_the_one_rule(name):
    recipe = load_recipe(RECIPES / name)
    loss = make_loss_config(recipe.algorithm.name, **recipe.algorithm.loss_params())
    assert recipe.learner.reference_model == needs_reference_model(loss.beta, loss.kl_reference)


@pytest.mark.parametrize("algorithm, beta, kl_reference, needed", [
    ("diffu_grpo", None, None, True), ("tracerl", None, None, False), ("gdpo", None, None, False),
    ("tracerl", 0.01, "ref", True), ("diffu_grpo", 0.0, None, False), ("diffu_grpo", 0.04, "old", False),
    ("wd1", None, None, False), ("spg", None, None, False)])
def test_reference_model_rule(algorithm, beta, kl_reference, needed):
    section = {"name": algorithm}
    if beta is not None:
        section["beta"] = beta
    if kl_reference is not None:
        section["kl_reference"] = kl_reference
    recipe = recipe_from_dict({"name": "t", "model": {"tiny": "sdar"}, "algorithm": section, "reward": "math",
                               "data": {"task": "arithmetic"}, "rollout": {"max_tokens": 16}})
    assert recipe.learner.reference_model is needed
    with pytest.raises(ValueError, match="reference_model") if needed else nullcontext():
        recipe_from_dict({**recipe.to_dict(), "learner": {**recipe.to_dict()["learner"], "reference_model": False}})


def test_learner_value_config_defaults_are_the_table():
    from rl.learner import ValueConfig

    assert {k: getattr(ValueConfig(), k) for k in ALGORITHM_DEFAULTS["tracerl"].value_model} == \
        dict(ALGORITHM_DEFAULTS["tracerl"].value_model)
