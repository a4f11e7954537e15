"""`diffrl sft`: writes a loadable checkpoint with its summary; never overwrites an existing one silently."""
from __future__ import annotations

import json

import torch

from launch.cli import main
from rollout.models.loading import load_policy


def test_sft_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "sft"
    args = [str(out), "--hidden-size", "32", "--num-layers", "1", "--steps", "6", "--batch-size", "8", "-q"]
    assert main(["sft", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["heldout_masked_ce_after"] < summary["heldout_masked_ce_before"]
    assert load_policy(out).spec.kind == "block"
    before = (out / "model.safetensors").read_bytes()
    assert main(["sft", *args]) == 2  # one-line error, exit status 2
    assert "exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_sft_from_a_recipe_takes_its_model_data_and_seed(tmp_path, capsys):
    """`diffrl sft OUT --recipe R key=value`: the recipe's model (kind, vocab) and data sections drive the run."""
    from pathlib import Path

    from launch.cli import build_parser, sft_run

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny-tracerl.yaml"
    args = build_parser().parse_args(["sft", str(tmp_path / "x"), "model.tiny=sdar", "data.task=countdown", "seed=7",
                                      "--recipe", str(recipe), "--steps", "2"])
    run = sft_run(args)
    assert (run.model.tiny, run.model.tiny_vocab, run.data.task, run.training.seed) == ("sdar", "small", "countdown", 7)
    assert (run.training.steps, run.data.chat_template) == (2, True)
    out = tmp_path / "sft"
    assert main(["sft", str(out), "--recipe", str(recipe), "model.tiny=sdar", "--hidden-size", "32",
                 "--num-layers", "1", "--steps", "2", "--batch-size", "4", "-q"]) == 0
    stored = json.loads((out / "sft.json").read_text())
    assert load_policy(out).spec.kind == "sdar" and stored["data"]["task"] == "arithmetic"
    assert stored["model"] == "tiny:sdar" and stored["config"]["seed"] == 0
    # the thread count is part of what reproduces the bits (float reductions round by it), so it is recorded
    assert stored["numerics"]["threads"] == torch.get_num_threads() and stored["numerics"]["torch"] == torch.__version__


def test_sft_cli_exposes_the_tiny_shape_warmup_and_eval_decoding(tmp_path):
    """Every option of the Python entry point that shapes the run is a flag; the flags' defaults are its defaults."""
    from launch.cli import build_parser, sft_run
    from launch.sft import SFTRun, TinySize, _policy
    from rl.sft import SFTConfig

    default = sft_run(build_parser().parse_args(["sft", str(tmp_path / "d")]))
    assert default.tiny_size == TinySize() and default.eval_decoding == SFTRun(out="x").eval_decoding
    assert default.training.warmup_steps == SFTConfig().warmup_steps
    run = sft_run(build_parser().parse_args([
        "sft", str(tmp_path / "x"), "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
        "--num-kv-heads", "1", "--intermediate-size", "48", "--warmup-steps", "0", "--eval-decoding", "dynamic"]))
    assert run.tiny_size.model_dump() == {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                          "intermediate_size": 48}
    assert (run.training.warmup_steps, run.eval_decoding) == (0, "dynamic")
    config = _policy(run, 0).model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 48)


def test_sft_tiny_kinds_are_the_recipes_but_diffusion_gemma(tmp_path):
    """`--tiny` offers every recipe `model.tiny` kind SFT can train; DiffusionGemma (no SFT layout for its canvas
    decoder) is refused with a one-line RecipeError, not a traceback, and nothing is written."""
    from typing import get_args

    import pytest

    from launch.cli import _TINY
    from launch.recipe import ModelSection, RecipeError
    from launch.sft import SFTRun, run_sft

    recipe_kinds = set(get_args(get_args(ModelSection.model_fields["tiny"].annotation)[0]))
    assert set(_TINY.values()) == recipe_kinds - {"diffusion-gemma"}
    run = SFTRun(out=str(tmp_path / "g"), model={"tiny": "diffusion-gemma"},
                 tiny_size={"hidden_size": 32, "num_layers": 1}, training={"steps": 1})
    with pytest.raises(RecipeError, match="DiffusionGemma"):
        run_sft(run, progress=False)
    assert not (tmp_path / "g").exists()
