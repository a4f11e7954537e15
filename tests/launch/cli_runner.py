"""Helpers of the end-to-end driver tests (tests/launch/test_driver_*.py): run the `diffrl` CLI as a subprocess in
its own session on a local Ray (127.0.0.1; whatever it leaves behind in that session is killed afterwards), and
read what a run wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict:
    out = dict(os.environ)
    out.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "TOKENIZERS_PARALLELISM": "false", **extra})
    out.pop("RAY_ADDRESS", None)
    return out


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the session already ended
        pass


CLI = ["-m", "launch.cli"]  # python arguments that start `diffrl`


def nan_fault_cli(step: int) -> list[str]:
    """python arguments that start `diffrl` with a NaN loss injected at `step` (tests/launch/nan_fault.py)."""
    return [str(Path(__file__).with_name("nan_fault.py")), str(step)]


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
            entry: list[str] = CLI) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, *entry, *args], cwd=cwd, env=env or cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def policy_bytes(run: Path, step: int) -> bytes:
    return (run / "checkpoints" / f"step_{step:06d}" / "policy" / "model.safetensors").read_bytes()


def train_in_process(recipe: Path, *overrides: str):
    """`diffrl train RECIPE OVERRIDES` without the subprocess: the same load_recipe + run_training the CLI calls
    (recipe_dir: the recipe's folder, as the CLI passes it), run in this process on the Ray already started by
    the module's `local_ray` fixture (the driver joins it: no Ray start and no torch import per run, ~10-15 s
    each on 2 cores). The CLI path itself is covered by tests/launch/test_driver.py and test_cli.py.
    An offline run (trainer.mode offline) needs no Ray. Returns the RunResult; a failed run raises with its
    traceback."""
    import ray

    from launch.driver import run_training
    from launch.recipe import load_recipe

    loaded = load_recipe(recipe, list(overrides))
    if loaded.trainer.mode != "offline" and not ray.is_initialized():  # an offline run needs no Ray
        raise RuntimeError("train_in_process: start Ray first (the local_ray fixture)")
    result = run_training(loaded, progress=False, recipe_dir=Path(recipe).resolve().parent)
    assert result.ok, result
    return result


def resume_in_process(run_dir: Path, *overrides: str):
    """`diffrl resume RUN_DIR OVERRIDES` in this process, as launch/cli.py's cmd_resume does it (the latest
    checkpoint, its recipe.yaml with output_dir and the overrides), on the module's Ray (see train_in_process).
    The CLI path itself is covered by tests/launch/test_driver.py."""
    from launch.driver import run_training
    from launch.recipe import load_recipe
    from rl.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(run_dir))
    recipe = load_recipe(ckpt.path / "recipe.yaml", [f"output_dir={run_dir}", *overrides])
    result = run_training(recipe, resume=ckpt, progress=False)
    assert result.ok, result
    return result
