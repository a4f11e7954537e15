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


@pytest.mark.parametrize("override,field", [("algorithm.value_model.lr=1e-5", "value_model"),
                                            ("model.lora.r=8", "model.lora"),
                                            ("learner.zero_stage=3", "zero_stage")])
def test_refused_combinations(override, field):
    with pytest.raises(RecipeError, match=field):
        load_recipe(RECIPES + "tracerl-diffusion-gemma.yaml", [override])


def test_preflight_and_load_need_no_mask_token(tmp_path):
    """DiffusionGemma's canvas starts from random tokens: a tokenizer without a mask token is fine."""
    import json

    from launch.preflight import check_checkpoint_dir
    from rollout.models.families.diffusion_gemma import make_tiny_diffusion_gemma
    from rollout.models.loading import load_policy

    ckpt = make_tiny_diffusion_gemma(tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        text = (ckpt / name).read_text().replace("<|mask|>", "<|unused|>")
        data = json.loads(text)
        data.pop("mask_token", None)
        (ckpt / name).write_text(json.dumps(data))
    check_checkpoint_dir(ckpt)
    policy = load_policy(ckpt)
    assert policy.tokenizer.mask_token is None and policy.spec.canvas_length == 8
