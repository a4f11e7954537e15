"""Three TraceRL steps through the driver (local Ray, in process) on a tiny SDAR-MoE checkpoint in the original
format (recipes/tiny-tracerl-sdar-moe.yaml, router load-balancing loss on): every logged metric stays finite, the
router aux loss is logged, the weights change, and the checkpointed policy keeps SDAR-MoE's config and names."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-tracerl-sdar-moe.yaml"


def test_three_tracerl_steps_on_sdar_moe(local_ray, tmp_path):
    from launch.driver import run_training
    from launch.recipe import load_recipe

    run = tmp_path / "run"
    # The `format` reward with a digit pattern gives a random-init model mixed groups, so advantages are non-zero.
    recipe = load_recipe(RECIPE, [f"output_dir={run}", "trainer.total_steps=3", "trainer.checkpoint_every=3",
                                  "data.task_kwargs.num_train=8", "reward.1.fn=format", r"reward.1.kwargs.pattern=\d"])
    result = run_training(recipe, progress=False)
    assert result.steps == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
    aux = [v for r in rows for k, v in r.items() if k.endswith("router_aux_loss")]
    assert len(aux) == 3 and all(v > 0 for v in aux)
    assert any(r["reward/std"] > 0 for r in rows)
    initial = load_file(str(run / "model_init" / "model.safetensors"))
    policy_dir = run / "checkpoints" / "step_000003" / "policy"
    trained = load_file(str(policy_dir / "model.safetensors"))
    assert sorted(trained) == sorted(initial)  # SDAR-MoE's per-expert names, nothing fused
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    assert json.loads((policy_dir / "config.json").read_text())["model_type"] == "sdar_moe"
