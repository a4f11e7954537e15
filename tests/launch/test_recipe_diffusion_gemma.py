"""DiffusionGemma recipes: the published sampler settings, and the estimator / model-kind pairing rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.decoding import decode_block, sampling_params
from launch.recipe import RecipeError, load_recipe
from rollout.models.families.diffusion_gemma import PUBLISHED_SAMPLER
from rollout.models.families.diffusion_gemma_sampler import SamplerSettings

RECIPES = str(Path(__file__).resolve().parents[2] / "recipes") + "/"


def test_real_recipe_has_the_released_sampler_settings():
    r = load_recipe(RECIPES + "tracerl-diffusion-gemma.yaml", [])
    assert (r.model.kind, r.model.block_size, r.rollout.block_size) == ("diffusion_gemma", 256, 256)
    assert r.estimator.name == "canvas_trace" and r.algorithm.name == "tracerl"
    params = sampling_params(r.rollout, block_size=decode_block(r))
    base = SamplerSettings(t_min=PUBLISHED_SAMPLER["t_min"], t_max=PUBLISHED_SAMPLER["t_max"])
    settings = base.with_params(params)
    assert settings == SamplerSettings(PUBLISHED_SAMPLER["max_denoising_steps"], PUBLISHED_SAMPLER["entropy_bound"],
                                       0.4, 0.8, PUBLISHED_SAMPLER["stability_threshold"],
                                       PUBLISHED_SAMPLER["confidence_threshold"])
    assert params.max_tokens == PUBLISHED_SAMPLER["max_new_tokens"]


def test_tiny_recipe_builds_a_tiny_diffusion_gemma():
    r = load_recipe(RECIPES + "tiny-tracerl-diffusion-gemma.yaml", [])
    assert r.model.tiny == "diffusion-gemma" and r.model.kind == "diffusion_gemma" and r.rollout.block_size == 8


@pytest.mark.parametrize("recipe,override", [("tiny-tracerl-diffusion-gemma.yaml", "estimator.name=trajectory"),
                                             ("tiny-tracerl.yaml", "estimator.name=canvas_trace")])
def test_canvas_trace_estimator_pairs_with_diffusion_gemma_only(recipe, override):
    with pytest.raises(RecipeError, match="canvas_trace"):
        load_recipe(RECIPES + recipe, [override])


def test_no_value_model_with_canvas_trace():
    with pytest.raises(RecipeError, match="value_model"):
        load_recipe(RECIPES + "tiny-tracerl-diffusion-gemma.yaml", ["algorithm.value_model.lr=1e-5"])
