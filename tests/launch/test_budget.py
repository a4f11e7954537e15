"""trainer.budget: a run stops at the first step boundary past its CPU- or wall-minutes, writes its final
checkpoint and says why; a resume counts what was already spent (checkpoint state)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.budget import RunBudget, tree_cpu_seconds
from launch.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-tracerl.yaml"


def test_cpu_clock_counts_child_processes():
    """A child burning CPU counts (the local Ray cluster's actors are children of the driver); sleeping does not."""
    start = tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 60
        while tree_cpu_seconds() - start < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_seconds() - start >= 0.5
    finally:
        child.kill()
        child.wait()
    idle = RunBudget(1.0, "cpu")
    time.sleep(0.3)
    assert idle.spent_s() < 0.25  # wall time passed, little CPU did


def test_budget_state_carries_over():
    budget = RunBudget(0.01, "wall")  # 0.6 s
    assert not budget.exhausted()
    budget.restore({"clock": "wall", "minutes": 0.01, "spent_s": 0.7})
    assert budget.exhausted() and budget.state_dict()["spent_s"] >= 0.7
    assert "budget: 0.01 of 0.01 wall-minutes spent at step 3 (of trainer.total_steps 9)" == budget.reason(3, 9)
    with pytest.raises(ValueError, match="minutes"):
        RunBudget(0, "cpu")


def test_recipe_budget_fields():
    r = load_recipe(RECIPE, ["trainer.budget.minutes=20", "trainer.budget.clock=wall"])
    assert r.trainer.budget.minutes == 20 and r.trainer.budget.clock == "wall"
    assert load_recipe(RECIPE).trainer.budget is None
    assert load_recipe(RECIPE, ["trainer.budget.minutes=5"]).trainer.budget.clock == "cpu"
    with pytest.raises(RecipeError, match="trainer.budget.minutes"):
        load_recipe(RECIPE, ["trainer.budget.minutes=0"])
    with pytest.raises(RecipeError, match="trainer.budget.clock: cpu counts this machine"):
        load_recipe(RECIPE, ["trainer.budget.minutes=5", "ray.address=ray://head:10001"])



@pytest.mark.ray
@pytest.mark.slow  # three driver starts (~90 s on 2 shared cores)
def test_tiny_budget_stops_early_and_resume_continues_it(tmp_path, local_ray):
    from launch.driver import Driver
    from launch.driver_setup import prepare_run, write_run_status
    from launch.metrics import closing_summary
    from rl.checkpoint import load_checkpoint

    run = tmp_path / "run"
    # 0.5 s of wall clock: a step takes longer, and the first check right after the start is far below it.
    overrides = [f"output_dir={run}", "trainer.total_steps=3", "trainer.budget.minutes=0.00833",
                 "trainer.budget.clock=wall", "data.task_kwargs.num_train=8", "data.task_kwargs.num_test=6"]

    def fit(recipe, resume=None):
        ctx = prepare_run(recipe, resume=resume)
        try:
            driver = Driver(ctx, resume=resume, progress=False)
            try:
                result = driver.fit()
            finally:
                driver.close()
        finally:
            ctx.release()
        write_run_status(ctx.run_dir, status="finished", stop_reason=result.stop_reason)
        return result

    first = fit(load_recipe(RECIPE, overrides))
    assert first.steps == 1 and first.stop_reason.startswith("budget: ") and "at step 1 (of" in first.stop_reason
    ckpt = load_checkpoint(run)
    assert ckpt.step == 1  # the final checkpoint of a stopped run
    spent = ckpt.state["budget"]["spent_s"]
    assert spent >= 0.5
    assert "stopped:    budget: " in closing_summary(run)
    # Resume with the same budget: already spent, no step is taken.
    again = fit(load_recipe(ckpt.path / "recipe.yaml", overrides), resume=ckpt)
    assert again.steps == 1 and again.stop_reason.startswith("budget: ")
    # A larger budget: the run continues to total_steps and the last checkpoint counts both runs' time; it
    # evaluates at the end, with the probe's greedy vs sampled accuracy.
    more = [*overrides[:2], "trainer.budget.minutes=30", *overrides[3:], "trainer.eval_every=3",
            "trainer.probe_items=2", "trainer.probe_samples=3"]
    ckpt = load_checkpoint(run)
    done = fit(load_recipe(ckpt.path / "recipe.yaml", more), resume=ckpt)
    assert done.steps == 3 and done.stop_reason == "total_steps: 3 of 3 steps done"
    final = load_checkpoint(run)
    assert final.step == 3 and final.state["budget"]["spent_s"] > spent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["budget/spent_min"] > 0 and r["learner/entropy"] > 0 and "adv/adv_abs_mean" in r for r in rows)
    assert rows[-1]["eval/probe/num_prompts"] == 2 and rows[-1]["eval/probe/samples"] == 3
    assert 0 <= rows[-1]["eval/probe/sampled_accuracy"] <= 1 and rows[-1]["eval/num_prompts"] == 6
