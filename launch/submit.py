"""`diffrl submit`: run a recipe as a Ray job on a cluster through the Ray Jobs SDK.

    job_id = submit(recipe_path, overrides, address="http://head:8265", follow=True, working_dir=Path("."))

The job's working_dir is the user's project: the current directory, or `--working-dir DIR` (runs/, .venv/, .git/
and caches excluded); the recipe must be inside it. diffrl's own packages (launch, rl, rollout, rewards) travel
with the job as py_modules when the project is not a diffrl checkout itself, so the cluster needs diffrl's
dependencies, not diffrl. The entrypoint is `python -m launch.cli train <recipe> <overrides>` inside the project,
which joins the cluster (RAY_ADDRESS is set inside a job) instead of starting one. The recipe is validated here
first, from the project directory as the cluster will see it, so a bad recipe fails on the laptop, not on the
cluster. Token authentication follows Ray's own conventions (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).

Paths are read on the cluster: relative input paths in the recipe file against the recipe's folder (inside the
uploaded project), relative paths in overrides against the project; an absolute path must exist on the cluster.
Set output_dir to shared storage to keep the run's outputs after the job ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from rollout.errors import OneLineError, one_line

log = logging.getLogger(__name__)

EXCLUDES = ["runs/", ".venv/", "venv/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "*.pyc"]
FORWARDED_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "RAY_USAGE_STATS_ENABLED": "0"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(OneLineError):
    """The job could not be submitted (bad address, recipe outside the project, authentication)."""


DIFFRL_PACKAGES = ("launch", "rl", "rollout", "rewards")


def diffrl_packages() -> list[Path]:
    """The directories of diffrl's own packages, wherever diffrl is installed (a checkout or site-packages)."""
    return [Path(__file__).resolve().parents[1] / name for name in DIFFRL_PACKAGES]


def build_job(recipe_path: str | Path, overrides: Sequence[str], working_dir: Path) -> tuple[str, dict]:
    """Entrypoint and runtime env for the recipe; the recipe must be inside working_dir (it is uploaded with it)."""
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: no such directory")
    recipe = Path(recipe_path).resolve()
    try:
        relative = recipe.relative_to(working_dir)
    except ValueError:
        raise SubmitError(f"{recipe_path}: the recipe must be inside the project {working_dir} (it is uploaded "
                          "as the job's working directory; run submit from the project or pass --working-dir)"
                          ) from None
    entrypoint = " ".join(["python", "-m", "launch.cli", "train", shlex.quote(relative.as_posix()),
                           *(shlex.quote(o) for o in overrides)])
    runtime_env = {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": dict(FORWARDED_ENV)}
    if not (working_dir / "launch" / "cli.py").is_file():  # a user's project: diffrl's code travels with it
        runtime_env["py_modules"] = [str(p) for p in diffrl_packages()]
    return entrypoint, runtime_env


@contextlib.contextmanager
def working_directory(path: Path):
    """Run the block with `path` as the working directory (restored after): validation sees the cluster's view."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def outside_project(recipe, project: Path) -> list[str]:
    """`field path` for each input path of the validated recipe that lies outside the uploaded project."""
    fields = [("model.path", recipe.model.path), ("data.train", recipe.data.train), ("data.eval", recipe.data.eval)]
    value_model = getattr(recipe.algorithm, "value_model", None)
    if value_model is not None:
        fields.append(("algorithm.value_model.path", value_model.path))
    fields += [(f"reward.{i}.fn", spec.file) for i, spec in enumerate(recipe.reward)]
    out = []
    for name, value in fields:
        if value is not None and not Path(value).resolve().is_relative_to(project):
            out.append(f"{name} {value}")
    return out


AUTH_HINT = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the "
             "cluster's token")


def _refused(address: str, err: BaseException, doing: str) -> SubmitError:
    """One line for a failed call to the dashboard: authentication (Ray's message is a multi-paragraph
    AuthenticationError), an unreachable address (requests' errors are OSErrors), or a refusal."""
    from ray.exceptions import AuthenticationError

    first = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 200)
    if isinstance(err, AuthenticationError):
        return SubmitError(f"--address {address}: {first}; {AUTH_HINT}")
    if isinstance(err, OSError):
        return SubmitError(f"--address {address}: cannot reach the Ray dashboard ({type(err).__name__}: {first})")
    return SubmitError(f"--address {address}: {doing} ({first})")


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (AuthenticationError, OSError, RuntimeError, ValueError) as err:
        raise _refused(address, err, "cannot reach the Ray dashboard") from None


def submit(recipe_path: str | Path, overrides: Sequence[str], *, address: str, follow: bool = False,
           wait: bool = False, working_dir: Path | None = None, timeout_s: float | None = None) -> tuple[str, str]:
    """Submit the job; returns (job_id, status). With follow, streams its logs until it ends; with wait, polls."""
    working_dir = Path(working_dir or Path.cwd()).resolve()
    entrypoint, runtime_env = build_job(recipe_path, overrides, working_dir)
    client = _client(address)
    from ray.exceptions import AuthenticationError

    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   metadata={"diffrl_recipe": str(recipe_path)})
    except (AuthenticationError, OSError, RuntimeError) as err:
        raise _refused(address, err, "submission refused") from None
    print(f"submitted job {job_id} to {address}; working directory uploaded: {working_dir}", flush=True)
    if follow:
        asyncio.run(_follow(client, job_id))
    status = _status(client, job_id)
    if follow or wait:
        status = _wait(client, job_id, timeout_s)
        print(f"job {job_id}: {status}", flush=True)
    return job_id, status


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _status(client, job_id: str) -> str:
    status = client.get_job_status(job_id)
    return str(getattr(status, "value", status))


def _wait(client, job_id: str, timeout_s: float | None) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        name = _status(client, job_id)
        if name in TERMINAL:
            return name
        if deadline is not None and time.monotonic() > deadline:
            return name
        time.sleep(1.0)
