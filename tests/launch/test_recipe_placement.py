"""Recipe fields of placement: resources.device, model.attn_implementation, learner.offload_optimizer, and the
defaults that follow the resolved placement (bf16 weights and the KV cache on GPU recipes; CPU recipes unchanged)."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.driver_roles import engine_options, learner_config
from launch.driver_setup import placement_plan
from launch.recipe import RecipeError, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BASE = {"name": "t", "model": {"tiny": "qwen3-block"}, "algorithm": "tracerl", "reward": [{"fn": "math"}],
        "data": {"task": "arithmetic"}, "rollout": {"max_tokens": 16}}


def _recipe(model=None, rollout=None, resources=None, learner=None):
    return recipe_from_dict({**BASE, "model": {**BASE["model"], **(model or {})},
                             "rollout": {**BASE["rollout"], **(rollout or {})},
                             "resources": resources or {}, "learner": learner or {}})


def _error(**sections) -> str:
    with pytest.raises(RecipeError) as info:
        _recipe(**sections)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("resources, on_gpu", [
    ({"gpus_per_worker": 0}, False),
    ({"gpus_per_worker": 0, "device": "cpu"}, False),
    ({"gpus_per_worker": 1}, True),
    ({"gpus_per_worker": 0.5, "device": "cuda"}, True),
    ({}, True),  # resources.gpus_per_worker defaults to 1
])
def test_defaults_follow_the_placement(resources, on_gpu):
    recipe = _recipe(resources=resources)
    assert recipe.model.dtype == ("bfloat16" if on_gpu else "float32")
    assert recipe.rollout.cache == ("auto" if on_gpu else "none")
    assert recipe_from_dict(recipe.to_dict()) == recipe  # the filled values round-trip


def test_explicit_values_beat_the_placement_defaults():
    gpu = _recipe(model={"dtype": "float32"}, rollout={"cache": "none"}, resources={"gpus_per_worker": 1})
    assert (gpu.model.dtype, gpu.rollout.cache) == ("float32", "none")
    cpu = _recipe(model={"dtype": "bfloat16"}, rollout={"cache": "block"}, resources={"gpus_per_worker": 0})
    assert (cpu.model.dtype, cpu.rollout.cache) == ("bfloat16", "block")


def test_shipped_cpu_recipes_keep_their_values():
    for name in ("tiny-base", "tiny-tracerl", "tiny-demo", "tiny-diffu-grpo", "tiny-gdpo"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert recipe.model.dtype == "float32" and recipe.resources.device == "auto", name
        assert recipe.rollout.cache in ("none", "block") and recipe.model.attn_implementation is None, name
    assert load_recipe(RECIPES / "tiny-base.yaml").rollout.cache == "none"


@pytest.mark.parametrize("sections, message", [
    ({"resources": {"gpus_per_worker": 0, "device": "cuda"}},
     "resources.device: 'cuda' requested but resources.gpus_per_worker is 0"),
    ({"resources": {"gpus_per_worker": 1, "device": "cpu"}},
     "resources.device: 'cpu', but resources.gpus_per_worker 1 reserves GPUs no actor would use"),
    ({"resources": {"device": "gpu"}}, "resources.device: "),
    ({"model": {"attn_implementation": "flash_attention_2"}},
     "model.attn_implementation: flash_attention_2 takes padding masks only"),
    ({"model": {"attn_implementation": "fast"}}, "model.attn_implementation: "),
    ({"learner": {"offload_optimizer": True}}, "learner.offload_optimizer: optimizer offload is DeepSpeed's"),
])
def test_bad_placement_fields_fail_in_one_line(sections, message):
    assert message in _error(**sections)


def test_recipe_fields_reach_the_actors():
    recipe = _recipe(model={"attn_implementation": "eager"}, resources={"gpus_per_worker": 1, "device": "cuda"},
                     learner={"backend": "deepspeed", "offload_optimizer": True})
    options = engine_options(recipe)
    assert options["device"] == "cuda" and options["attn_implementation"] == "eager"  # resolved in the actor
    assert str(options["dtype"]) == "torch.bfloat16" and options["kv_cache"] == "auto"
    assert learner_config(recipe).offload_optimizer is True
    assert "attn_implementation" not in engine_options(_recipe(resources={"gpus_per_worker": 0}))


def test_colocated_placement_must_share_a_node():
    colocated = placement_plan(_recipe(resources={"gpus_per_worker": 1, "placement": "colocated"}))
    split = placement_plan(_recipe(resources={"gpus_per_worker": 1, "placement": "split"}))
    assert colocated.strategy == "STRICT_PACK" and split.strategy == "PACK"
    assert colocated.bundles == [{"CPU": 1.0, "GPU": 1.0}] and colocated.rollout_resources["num_gpus"] == 0.5
