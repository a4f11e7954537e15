"""End to end, colocated placement (tiny recipe, run_training in process on the module's local Ray at 127.0.0.1): the
rollout workers sleep through the learner update (their weights freed, reported as rollout/sleep_freed_bytes) and wake
after it; the engine's KV cache fill under rollout.memory_budget reaches the step metrics."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

RECIPE = cli.REPO / "recipes" / "tiny-tracerl.yaml"
OVERRIDES = ["trainer.total_steps=2", "resources.placement=colocated", "rollout.memory_budget=200KiB",
             "data.task_kwargs.num_train=8", "reward.1.fn=format", r"reward.1.kwargs.pattern=\d"]


def test_colocated_rollout_sleeps_through_the_update_and_reports_cache_fill(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "colocated"
    assert cli.train_in_process(RECIPE, f"output_dir={run}", *OVERRIDES).steps == 2
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rollout/sleep_freed_bytes"] > 0  # every worker's weights left during the update
        assert row["rollout/memory_budget_bytes"] == 200 * 1024
        assert 0 < row["rollout/cache_allocated_bytes"] <= 200 * 1024
        assert 0 < row["rollout/cache_fill_mean"] <= row["rollout/cache_fill_peak"] <= 1
    assert rows[1]["version"] == 2  # the step after a sleep decoded with woken, re-synced weights
