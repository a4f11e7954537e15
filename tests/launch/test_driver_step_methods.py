"""Three RL steps of each per-step method (AGRPO, MDPO, d-TreeRPO) through the driver (run_training in process, one
local Ray shared by the module) on the tiny model: finite metrics."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# The `format` reward with a digit pattern: a dense signal for a random-init model (groups mix 0 and 1).
OVERRIDES = ["trainer.total_steps=3", "data.task_kwargs.num_train=8", "reward.1.fn=format",
             r"reward.1.kwargs.pattern=\d"]


@pytest.mark.parametrize("recipe", ["tiny-agrpo", "tiny-mdpo", "tiny-dtreerpo"])
def test_three_steps_with_finite_metrics(local_ray, tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / recipe
    assert cli.train_in_process(cli.REPO / "recipes" / f"{recipe}.yaml", f"output_dir={run}", *OVERRIDES).steps == 3
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("learner/loss", "learner/grad_norm", "learner/ratio_mean"):
            assert key in row and math.isfinite(row[key]), (key, row.get(key))
        assert row["learner/optimizer_steps"] >= 1
        if recipe == "tiny-mdpo":  # one learner sample per trained step (train_steps 4), a reward per step
            assert row["learner/num_samples"] == 4 * row["learner/samples"] > 0
            assert row["reward/step_calls"] >= 8 * row["learner/samples"]
        if recipe == "tiny-dtreerpo":  # trees of 4 leaves: at most 2 + 4 edges per 4 leaves (edges may be empty)
            assert row["learner/samples"] == 16 and 0 < row["learner/num_samples"] <= 24
