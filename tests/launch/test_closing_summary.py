"""The closing summary of `diffrl train` and the curves plot, from a hand-written metrics.jsonl (no Ray)."""
from __future__ import annotations

import json

from launch.metrics import closing_summary, moving_average, plot_curves


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 3) == [1.0, 1.5, 2.0, 3.0, 17.0 / 3]
    assert moving_average([5.0, 7.0], 1) == [5.0, 7.0]


def test_summary_reports_first_and_last_three_steps_and_eval(tmp_path):
    run = tmp_path / "run"
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/num_prompts": 15}]
    rows += [{"step": s, "reward/mean": r} for s, r in enumerate([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8], start=1)]
    rows[-1].update({"eval/accuracy": 0.4, "eval/num_prompts": 15})
    write_run(run, rows)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000007\n")
    assert plot_curves(run / "metrics.jsonl", run / "curves.png") is not None
    summary = closing_summary(run)
    assert f"run finished: {run}" in summary
    assert "training reward: 0.200 -> 0.700 (mean of steps 1-3 -> 5-7)" in summary
    assert "held-out accuracy: 0.20 (step 0) -> 0.40 (step 7)" in summary
    assert f"plot:       {run / 'curves.png'}" in summary
    assert f"checkpoint: {run / 'checkpoints' / 'step_000007'}" in summary


def test_summary_without_eval_or_plot_says_only_what_exists(tmp_path):
    run = tmp_path / "run"
    write_run(run, [{"step": 1, "reward/mean": 0.5}])
    summary = closing_summary(run)
    assert "held-out" not in summary and "plot:" not in summary and "checkpoint:" not in summary
    assert "training reward: 0.500 -> 0.500" in summary
