"""`diffrl` on bad input: one line `diffrl: error: ...` naming the field or file, exit status 2, before Ray starts,
and nothing already written is touched. Most cases call `main()` in-process (fast); one goes through the console
script to pin the exit status of the real command."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny-tracerl.yaml")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert err[-1].startswith("diffrl: error: "), err
    return err[-1]


def _train(tmp_path, *overrides: str) -> int:
    return main(["train", RECIPE, f"output_dir={tmp_path / 'run'}", "-q", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model.tiny=null", "model.tiny_vocab=null", "model.path=/nonexistent/model"],
     "model.path: /nonexistent/model: no such directory"),
    (["data.task=null", "data.task_kwargs={}", "data.train=/nonexistent/train.jsonl"],
     "data.train: /nonexistent/train.jsonl: no such file"),
    (["reward.0.fn=no_such_reward"], "reward[0].fn: unknown reward 'no_such_reward'"),
    (["reward.0.fn=launch.data:no_such_fn"], "reward[0].fn: module 'launch.data' has no function 'no_such_fn'"),
    (["reward.0.fn=/nonexistent/reward.py:score"], "reward.0.fn: /nonexistent/reward.py: no such file"),
    (["trainer.total_stepz=3"], "trainer.total_stepz: unknown key"),
])
def test_bad_recipe_inputs(tmp_path, capsys, overrides, message):
    assert _train(tmp_path, *overrides) == 2
    assert message in _error(capsys)


def test_dataset_row_without_answer(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    assert _train(tmp_path, "data.task=null", "data.task_kwargs={}", f"data.train={data}") == 2
    line = _error(capsys)
    assert f"data.train: {data}: 1 of 2 rows unusable; first at line 2: no answer (field 'answer'" in line


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert _train(tmp_path) == 2
    line = _error(capsys)
    assert "already holds a run (metrics.jsonl)" in line and f"diffrl resume {run}" in line
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _fake_run(tmp_path, tiny_model_dirs, layout: dict | None = None) -> Path:
    """A run directory with one real checkpoint (tiny policy, recipe, cursors, the learner shards' layout of one
    torch rank or `layout`; no shard: nothing gets that far) and a metrics file."""
    from launch.recipe import load_recipe
    from rl.checkpoint import capture_rng, save_checkpoint
    from rollout.models.loading import load_policy, save_policy

    run = tmp_path / "run"
    recipe = load_recipe(RECIPE, [f"output_dir={run}"])
    one_torch_rank = {"format": 1, "world_size": 1, "backend": "torch", "zero_stage": None}
    policy = load_policy(tiny_model_dirs["block"])
    save_checkpoint(run / "checkpoints", 2, writers={"policy": lambda d: save_policy(policy, d),
                                                     "learner": lambda d: (d / "layout.json").write_text(
                                                         json.dumps(layout or one_torch_rank))},
                    state={"version": 2, "data": {"position": 8}, "store": {"files": [], "rows": 0}},
                    rng=capture_rng(), recipe_yaml=recipe.to_yaml())
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return run


def test_corrupt_checkpoint_on_resume(tmp_path, capsys, tiny_model_dirs):
    run = _fake_run(tmp_path, tiny_model_dirs)
    weights = run / "checkpoints" / "step_000002" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["resume", str(run), "-q"]) == 2
    assert f"{weights}: 100 bytes, manifest says" in _error(capsys)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_with_another_learner_layout(tmp_path, capsys, tiny_model_dirs):
    run = _fake_run(tmp_path, tiny_model_dirs, {"format": 1, "world_size": 2, "backend": "deepspeed", "zero_stage": 3})
    assert main(["resume", str(run), "-q"]) == 2
    layout = run / "checkpoints" / "step_000002" / "learner" / "layout.json"
    assert f"{layout}: saved with learner world_size 2, this run has 1" in _error(capsys)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_of_a_run_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    assert main(["resume", str(tmp_path / "empty-run")]) == 2
    assert "no checkpoint yet" in _error(capsys)


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--data", "arithmetic"]) == 2
    assert "no such run or checkpoint directory" in _error(capsys)


def test_status_lists_runs(tmp_path, capsys, tiny_model_dirs):
    run = _fake_run(tmp_path, tiny_model_dirs)
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "run.json").write_text(json.dumps({"status": "finished", "total_steps": 2, "updated": 0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward/mean": 0.5, "time/step_s": 1.0}) + "\n")
    dead = tmp_path / "crashed"
    dead.mkdir()
    (dead / "recipe.yaml").write_text("name: y\n")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (dead / "run.json").write_text(json.dumps({"status": "running", "pid": int(gone), "host": socket.gethostname(),
                                               "total_steps": 5, "updated": time.time()}))
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run: finished; step 2/2; checkpoint step_000002" in out and "reward 0.500" in out
    assert f"crashed: died (process {gone} is gone; `diffrl resume {dead}` continues it); step 0/5" in out


def test_console_script_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "launch.cli", "train", RECIPE, f"output_dir={tmp_path}/r",
                           "rollout.max_tokens=-1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrl: error: ") and "rollout.max_tokens" in lines[0]
