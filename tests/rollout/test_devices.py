"""rollout/devices.py: the one rule that picks an actor's device, and the attention kernels a recipe may name."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rollout.devices import (ACCELERATOR_ENV, DeviceError, actor_device, check_request, choose_device,
                             default_dtype, uses_accelerator)
from rollout.models.loading import load_policy
from rollout.models.masks import sequence_block_ids
from rollout.models.spec import ModelLoadError

_spec = importlib.util.spec_from_file_location("naive_qwen3", Path(__file__).with_name("naive_qwen3.py"))
naive_qwen3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(naive_qwen3)
_models_spec = importlib.util.spec_from_file_location("_model_tests", Path(__file__).with_name("test_models.py"))
_models = importlib.util.module_from_spec(_models_spec)
_models_spec.loader.exec_module(_models)


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("requested, gpu_ids, available, expected", [
    ("auto", [0], True, "cuda"),      # Ray assigned a GPU torch can use
    ("auto", ["3"], True, "cuda"),    # any id: CUDA_VISIBLE_DEVICES makes it the actor's cuda:0
    ("auto", [], True, "cpu"),        # an actor without GPUs on a GPU node stays on CPU
    ("auto", [], False, "cpu"),
    ("cpu", [0], True, "cpu"),        # asked for the CPU: the CPU, whatever Ray assigned
    ("cuda", [0], True, "cuda"),
    ("auto", None, True, "cuda"),     # outside Ray: torch's own view
    ("auto", None, False, "cpu"),
    ("cuda", None, True, "cuda"),
])
def test_choose_device(requested, gpu_ids, available, expected):
    assert choose_device(requested, gpu_ids, accelerator_available=available) == expected


@pytest.mark.parametrize("requested, gpu_ids, available, message", [
    ("cuda", [], True, "resources.device: 'cuda' requested but Ray assigned this actor no GPU"),
    ("cuda", None, False, "resources.device: 'cuda' requested but torch sees no cuda device"),
    ("auto", [0], False, "resources.device: Ray assigned GPU ids [0] but torch cannot use cuda"),
    ("cuda", [1], False, "resources.device: Ray assigned GPU ids [1] but torch cannot use cuda"),
    ("gpu", [0], True, "resources.device: 'gpu' is not one of auto, cpu, cuda"),
])
def test_impossible_devices_fail_in_one_line(requested, gpu_ids, available, message):
    with pytest.raises(DeviceError) as err:
        choose_device(requested, gpu_ids, accelerator_available=available)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_accelerator_type_is_what_the_rule_returns():
    assert choose_device("auto", [0], accelerator="meta", accelerator_available=True) == "meta"
    assert choose_device("auto", [], accelerator="meta", accelerator_available=True) == "cpu"


def test_actor_device_outside_ray_and_with_the_test_hook(monkeypatch):
    monkeypatch.delenv(ACCELERATOR_ENV, raising=False)
    assert actor_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert actor_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(ACCELERATOR_ENV, "meta")  # outside Ray the hook's device counts as present
    assert actor_device("auto") == torch.device("meta") and actor_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(ACCELERATOR_ENV, "warp-drive")
    with pytest.raises(DeviceError, match=f"{ACCELERATOR_ENV}: 'warp-drive' is not a torch device type"):
        actor_device("auto")


def test_recipe_level_placement():
    assert uses_accelerator("auto", 1) and uses_accelerator("auto", 0.5) and uses_accelerator("cuda", 1)
    assert not uses_accelerator("auto", 0) and not uses_accelerator("cpu", 1)
    assert (default_dtype(True), default_dtype(False)) == ("bfloat16", "float32")
    assert check_request("auto", 0) is None and check_request("cuda", 2) is None
    assert check_request("cuda", 0).startswith("resources.device: 'cuda' requested but resources.gpus_per_worker is 0")


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_kernels_honour_block_diffusion_masks(tiny_model_dirs, attn):
    """Each kernel a recipe may name gives the logits of a plain re-implementation with the block-causal rule
    (diffrl passes additive float masks: transformers' eager kernel adds the mask to the scores, so a bool mask
    there would be silently wrong). transformers' flex_attention is not run here: with a dense mask its score_mod
    indexes `mask[b][0][q][kv]`, which segfaults the compiled CPU kernel under torch 2.13 (benchmarks/gpu_smoke.py
    --attn flex_attention compares it with sdpa on a GPU). diffrl's own FlexAttention kernel over mask descriptions
    (model.attention_kernel: flex) runs on CPU without gradients: tests/rollout/test_attention.py."""
    model_dir = tiny_model_dirs["sdar"]
    policy = load_policy(model_dir, attn_implementation=attn)
    assert policy.attn_implementation == attn  # under diffrl's dispatcher (rollout/models/attention.py)
    prompt_len, ids = 5, _models._random_ids(policy, 5 + 8, seed=11)
    ours = _models._full_logits(policy, ids, prompt_len)
    blocks = sequence_block_ids(prompt_len, 8, 4)
    ref = naive_qwen3.naive_qwen3_logits(model_dir, ids, torch.arange(ids.numel()), blocks[None, :] <= blocks[:, None])
    assert (ours - ref).abs().max().item() <= 1e-4


def test_flash_attention_is_refused(tiny_model_dirs):
    with pytest.raises(ModelLoadError, match="model.attn_implementation: 'flash_attention_2' cannot take"):
        load_policy(tiny_model_dirs["block"], attn_implementation="flash_attention_2")
