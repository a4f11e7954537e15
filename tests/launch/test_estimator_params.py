"""Contract: every recipe estimator section's params() are accepted by the rl estimator of the same name."""
from __future__ import annotations

import pytest
import torch

from launch.recipe import recipe_from_dict
from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput

CASES = [
    ("diffu_grpo", {"name": "one_step"}, "block"),
    ("gdpo", {"name": "mc_elbo", "mc_num": 2}, "llada"),
    ("gdpo", {"name": "sdmc", "quadrature": "simpson"}, "llada"),
    ("gdpo", {"name": "sdmc", "quadrature": "gauss-2", "weighting": "count"}, "llada"),
    ("coupled_grpo", {"name": "coupled"}, "dream"),
    ("gdpo", {"name": "block_elbo", "mc_num": 2}, "block"),
    ("tracerl", {"name": "trajectory", "shrink": 2}, "block"),
    ("random_mask_grpo", {"name": "random_mask", "mc_num": 2}, "llada"),
]


@pytest.mark.parametrize("algorithm, estimator, kind", CASES)
def test_recipe_estimator_params_drive_the_estimator(tiny_policies, algorithm, estimator, kind):
    tiny = {"block": "qwen3-block"}.get(kind, kind)
    recipe = recipe_from_dict({"name": "contract", "model": {"tiny": tiny}, "data": {"task": "arithmetic"},
                               "reward": [{"fn": "math"}], "algorithm": {"name": algorithm}, "estimator": estimator})
    params = recipe.estimator.params()
    policy = tiny_policies[kind]
    inp = EstimatorInput([torch.arange(10, 14)], [torch.arange(20, 28)], ["k"],
                         step_maps=[torch.arange(8) // 2], block_size=policy.spec.block_size)
    with torch.no_grad():
        est = get_estimator(recipe.estimator.name)(policy, inp, seed=0, **params)
    assert torch.isfinite(est.seq_logp).all()
    if "mc_num" in estimator:
        assert est.forwards == estimator["mc_num"]
