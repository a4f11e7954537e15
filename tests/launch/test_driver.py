"""End to end: `diffrl train` / `diffrl resume` as subprocesses on a local Ray cluster (127.0.0.1), tiny recipe.

Both start from a TraDo/SDAR-format checkpoint directory (a tiny one built offline). Run A trains 4 steps
uninterrupted. Run B is the same recipe, but a rollout worker is killed (SIGKILL) while it
generates and the driver itself is killed after the step-2 checkpoint; `diffrl resume` finishes it. Both inject a
NaN loss at step 3. B must end with weights bitwise equal to A's. The prompt set holds 8 prompts and a step takes
4, so the checkpoint B resumes from sits exactly on an epoch boundary.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

RECIPE = cli.REPO / "recipes" / "tiny-tracerl.yaml"
# The `format` built-in with a digit pattern: a dense signal for a random-init model (most groups mix 0 and 1),
# so the learner sees non-zero advantages from step 1 on.
OVERRIDES = ["trainer.total_steps=4", "trainer.checkpoint_every=1", "trainer.keep_last=10",
             "data.task_kwargs.num_train=8", "reward.1.fn=format", r"reward.1.kwargs.pattern=\d"]
NAN_STEP = 3
FAULTY_CLI = cli.nan_fault_cli(NAN_STEP)  # `diffrl` with a NaN loss at step 3 (injected from the test side)


def env() -> dict:
    return cli.cli_env()


def diffrl(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return cli.run_cli(*args, cwd=cwd, timeout=timeout, env=env(), entry=FAULTY_CLI)


def policy_bytes(ckpt: Path) -> bytes:
    return (ckpt / "policy" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def sdar_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["sdar"]


def from_sdar(sdar: Path) -> list[str]:
    return ["model.tiny=null", "model.tiny_vocab=null", f"model.path={sdar}"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, sdar_dir):
    root = tmp_path_factory.mktemp("driver")
    run = root / "A"
    done = diffrl("train", str(RECIPE), f"output_dir={run}", *OVERRIDES, *from_sdar(sdar_dir),
                  "trainer.log=[jsonl,tensorboard]", "-q", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done, sdar_dir


def test_train_runs_steps_and_writes_everything(run_a):
    run, done, sdar = run_a
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # rewards were computed (every response has a reason; the digit reward gives a signal)
    assert all(sum(v for k, v in r.items() if k.startswith("reward/reason/")) == 16 for r in rows)
    assert any(r["reward/std"] > 0 for r in rows)
    # the rollout side advanced: step k generated with version k-1
    assert [r["rollout/version"] for r in rows] == [0, 1, 2, 3]
    # weights changed
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    initial = (sdar / "model.safetensors").read_bytes()
    assert policy_bytes(ckpts / "step_000001") != initial
    config = json.loads((ckpts / "step_000004" / "policy" / "config.json").read_text())
    assert config["model_type"] == "sdar"  # saved in the format it came in
    assert policy_bytes(ckpts / "step_000004") != policy_bytes(ckpts / "step_000002")
    # store: one Parquet file per step, readable with `datasets`
    from rl.store import read_store

    ds = read_store(run / "store")
    assert ds.num_rows == 64 and sorted(set(ds["step"])) == [1, 2, 3, 4]
    assert set(ds["version"]) == {0, 1, 2, 3} and all(r is not None for r in ds["reward"])
    assert len(ds[0]["response_ids"]) == len(ds[0]["step_map"]) == len(ds[0]["logprobs"])
    # outputs of a finished run
    assert (run / "curves.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert "step 4/4" in done.stdout
    status = subprocess.run([sys.executable, "-m", "launch.cli", "status", str(run.parent)], capture_output=True,
                            text=True, env=env(), timeout=60)
    assert "A: finished; step 4/4; checkpoint step_000004" in status.stdout


def test_nan_loss_skips_the_step_and_keeps_the_weights(run_a):
    run, _, _ = run_a
    row = cli.metrics(run)[2]
    assert row["step"] == 3 and row["learner/nan_skipped"] > 0 and row["learner/skipped"] == 1
    assert row["counters/nan_skipped_steps"] == 1
    ckpts = run / "checkpoints"
    assert policy_bytes(ckpts / "step_000003") == policy_bytes(ckpts / "step_000002")
    assert policy_bytes(ckpts / "step_000004") != policy_bytes(ckpts / "step_000003")


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_killed_worker_and_driver_then_resume_is_bitwise_equal(run_a, tmp_path):
    import psutil

    run_a_dir, _, sdar = run_a
    run = tmp_path / "B"
    args = ["train", str(RECIPE), f"output_dir={run}", *OVERRIDES, *from_sdar(sdar), "-q"]
    proc = subprocess.Popen([sys.executable, *FAULTY_CLI, *args], cwd=tmp_path, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    killed_worker = None
    try:
        deadline = time.monotonic() + 240
        latest = run / "checkpoints" / "latest"
        while time.monotonic() < deadline and proc.poll() is None:
            if killed_worker is None:
                # kill -9 the rollout worker while it generates; should step 1's generation slip by between two
                # polls, kill it right after the step-1 checkpoint, while step 2 syncs weights or generates
                late = latest.is_file()
                for child in _descendants(proc.pid):
                    try:
                        if child.name().startswith("ray::RolloutWorker.generate" if not late else "ray::Rollout"):
                            child.kill()
                            killed_worker = child.pid
                    except psutil.NoSuchProcess:
                        continue
            elif latest.is_file() and latest.read_text().strip() == "step_000002":
                proc.kill()  # kill -9 the driver right after the step-2 checkpoint
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
        log = proc.stdout.read()
    finally:
        cli.kill_group(proc.pid)
    assert killed_worker is not None, "never found the rollout worker: " + log[-2000:]
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    before = cli.metrics(run)
    assert [r["step"] for r in before][:2] == [1, 2] and before[1]["rollout/restarts"] >= 1

    done = diffrl("resume", str(run), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["data/epoch"] == 1 and rows[2]["learner/skipped"] == 1
    reference = cli.metrics(run_a_dir)
    for key in ("reward/mean", "learner/loss", "rollout/response_len"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in reference], key
    for step in (2, 3, 4):
        name = f"step_{step:06d}"
        assert policy_bytes(run / "checkpoints" / name) == policy_bytes(run_a_dir / "checkpoints" / name), name
    from rl.store import read_store

    ours, theirs = read_store(run / "store"), read_store(run_a_dir / "store")
    assert ours["response_ids"] == theirs["response_ids"] and ours["reward"] == theirs["reward"]
