"""End to end, trainer.mode offline through the driver (run_training in process, as `diffrl train` calls it): VRPO
on the tiny preference file and dTRPO from the trajectory store a short tiny TraceRL run wrote (that run on the
module's local Ray at 127.0.0.1). Three steps
each: finite metrics, the first step exactly at the reference (margin 0, loss log 2), weights changed."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def _check_three_steps(run: Path) -> list[dict]:
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float))), r
        assert r["learner/optimizer_steps"] >= 1 and r["learner/nan_skipped"] == 0
    # step 1 starts at the reference and the reference shares the policy's masks: every implicit reward is 0
    assert rows[0]["learner/reward_margin"] == 0.0
    assert rows[0]["learner/pair_loss"] == pytest.approx(math.log(2), abs=1e-6)
    initial = (run / "model_init" / "model.safetensors").read_bytes()
    assert cli.policy_bytes(run, 3) != initial
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["mode"] == "offline"
    return rows


def test_vrpo_three_steps_on_the_tiny_preference_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "vrpo"
    done = cli.train_in_process(cli.REPO / "recipes" / "tiny-vrpo.yaml", f"output_dir={run}",
                                "trainer.total_steps=3", "estimator.mc_num=2")
    assert done.steps == 3
    rows = _check_three_steps(run)
    assert all(r["learner/forwards_ref"] == 4 for r in rows)  # 2 micro-batches x n = 2 masked forwards


@pytest.mark.ray
def test_dtrpo_three_steps_offline_from_a_tiny_runs_store(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "tracerl"
    done = cli.train_in_process(cli.REPO / "recipes" / "tiny-tracerl.yaml", f"output_dir={source}",
                                "trainer.total_steps=1", "reward.1.fn=format", r"reward.1.kwargs.pattern=\d")
    assert done.steps == 1
    run = tmp_path / "dtrpo"
    done = cli.train_in_process(cli.REPO / "recipes" / "tiny-dtrpo.yaml", f"output_dir={run}",
                                f"data.trajectories={source}", "trainer.total_steps=3", "data.pairs_per_step=1")
    assert done.steps == 3
    rows = _check_three_steps(run)
    assert all(r["learner/forwards_ref"] == 1 for r in rows)  # one re-masked forward per micro-batch
    assert all(r["learner/data_version_mean"] == 0 for r in rows)  # the store's step-1 rollouts: version 0
    assert not (run / "store").exists()  # an offline run rolls nothing out
    # The store's rollouts were decoded by version 0 (the reference) at temperature 1: their recorded log-probs
    # stand in for the reference's forward (no reference model loaded); step 1 starts at the reference up to the
    # rollout-vs-learner numerical gap.
    stored = tmp_path / "dtrpo-stored"
    done = cli.train_in_process(cli.REPO / "recipes" / "tiny-dtrpo.yaml", f"output_dir={stored}",
                                f"data.trajectories={source}", "trainer.total_steps=1", "data.pairs_per_step=1",
                                "algorithm.reference_logp=stored")
    assert done.steps == 1
    row = cli.metrics(stored)[0]
    assert row["learner/forwards_ref"] == 0 and abs(row["learner/reward_margin"]) < 1e-4, row
    assert row["learner/pair_loss"] == pytest.approx(rows[0]["learner/pair_loss"], abs=1e-4)


def test_offline_run_stops_at_its_budget_with_a_checkpoint(tmp_path):
    """trainer.budget ends an offline run as it ends an online one: at the first step boundary past it (here a
    wall budget spent by the first update), with a checkpoint of that step and the budget as the stop reason."""
    from launch.driver_offline import run_offline
    from launch.recipe import load_recipe

    run = tmp_path / "vrpo-budget"
    recipe = load_recipe(cli.REPO / "recipes" / "tiny-vrpo.yaml",
                         [f"output_dir={run}", "trainer.total_steps=50", "estimator.mc_num=2",
                          "trainer.budget={minutes: 1.0e-6, clock: wall}"])
    result = run_offline(recipe, progress=False, recipe_dir=cli.REPO / "recipes")
    assert result.steps == 1 and result.stop_reason.startswith("budget: ")
    assert [r["step"] for r in cli.metrics(run)] == [1]
    assert (run / "checkpoints" / "step_000001" / "policy").is_dir()
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 1 and status["stop_reason"].startswith("budget")
