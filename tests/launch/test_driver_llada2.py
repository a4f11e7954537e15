"""Three RL steps on a tiny LLaDA2 through the driver (run_training in process, one local Ray shared by the module):
TraceRL with the trajectory estimator (recipes/tiny-tracerl-llada2.yaml) and GDPO on the block ELBO. Each run must
change the weights, keep every logged metric finite, and leave checkpoints in the released LLaDA2 format that load back.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

RECIPE = cli.REPO / "recipes" / "tiny-tracerl-llada2.yaml"
# A digit-pattern reward: a dense signal for a random-init model, so advantages are non-zero from the start.
DENSE_REWARD = ["reward.1.fn=format", r"reward.1.kwargs.pattern=\d", "trainer.total_steps=3",
                "trainer.checkpoint_every=3", "trainer.log=[jsonl]"]
GDPO_BLOCK_ELBO = """\
extends: {base}
name: tiny-gdpo-llada2
model:
  tiny: llada2
rollout:
  block_size: 32
  steps_per_block: 32
  remasking: threshold_schedule
  threshold: 0.95
  max_tokens: 64
  cache: block
estimator:
  name: block_elbo
  mc_num: 1
"""


@pytest.fixture(autouse=True)
def _ray_and_cwd(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _train(recipe: Path, run: Path, cwd: Path):
    assert cli.train_in_process(recipe, f"output_dir={run}", *DENSE_REWARD).steps == 3
    return run


def _check_run(run: Path) -> None:
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (row["step"], key, value)
    assert any(r["learner/grad_norm"] > 0 for r in rows)  # the learner saw non-zero advantages
    initial = load_file(str(run / "model_init" / "model.safetensors"))
    final_dir = run / "checkpoints" / "step_000003" / "policy"
    final = load_file(str(final_dir / "model.safetensors"))
    assert set(final) == set(initial)  # the released names
    changed = [k for k in initial if not (initial[k] == final[k]).all()]
    assert changed, "no weight changed in three RL steps"
    assert any(".mlp.experts." in k for k in changed) and any(".mlp.gate.weight" in k for k in changed)
    config = json.loads((final_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llada2_moe", ["LLaDA2MoeModelLM"])
    from rollout.models.loading import load_policy

    assert load_policy(final_dir).spec.kind == "llada2"


def test_tracerl_three_steps_on_llada2(tmp_path):
    _check_run(_train(RECIPE, tmp_path / "tracerl", tmp_path))


def test_gdpo_block_elbo_three_steps_on_llada2(tmp_path):
    recipe = tmp_path / "gdpo-llada2.yaml"
    recipe.write_text(GDPO_BLOCK_ELBO.format(base=cli.REPO / "recipes" / "tiny-gdpo.yaml"))
    _check_run(_train(recipe, tmp_path / "gdpo", tmp_path))
