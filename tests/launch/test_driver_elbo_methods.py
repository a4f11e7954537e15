"""ESPO, BGPO, EBPO end to end: three RL steps of each tiny recipe through the driver (run_training in process, on one
local Ray on 127.0.0.1 shared by the module), every logged metric finite, the policy weights changed, and the method's
own quantities in the metrics."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# The `format` built-in with a digit pattern: a dense signal for a random-init model (groups mix 0 and 1).
OVERRIDES = ["trainer.total_steps=3", "data.task_kwargs.num_train=8", "reward.1.fn=format",
             r"reward.1.kwargs.pattern=\d"]


@pytest.mark.parametrize("recipe,expected", [
    ("tiny-espo", ("learner/kl", "learner/ratio_mean", "learner/clipfrac")),
    ("tiny-bgpo", ("learner/elbo", "learner/ratio_mean")),
    ("tiny-ebpo", ("learner/elbo_per_token", "learner/ratio_mean", "learner/clipfrac")),
])
def test_three_rl_steps_with_finite_metrics(local_ray, tmp_path, monkeypatch, recipe, expected):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / recipe
    assert cli.train_in_process(cli.REPO / "recipes" / f"{recipe}.yaml", f"output_dir={run}", *OVERRIDES).steps == 3
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        for key in expected:
            assert key in row, (key, sorted(row))
        assert row["learner/optimizer_steps"] >= 1 and row["learner/nan_skipped"] == 0
