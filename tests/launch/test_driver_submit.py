"""`diffrl submit` against a real `ray start --head` on 127.0.0.1 (token auth, every port chosen free, its own temp
dir), stopped afterwards by signalling only the processes this test started. The job runs the tiny recipe in async
mode with split placement, so this also covers the bounded-staleness loop and the split placement group."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """One head for the module's jobs (a cluster start and stop is ~7 s on 2 shared cores); each job brings its
    own working directory and output_dir, and the driver kills its actors when the job ends."""
    ports = dict(zip(PORTS, _free_ports(len(PORTS))))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="drh", dir="/tmp")  # short: Ray's unix socket paths live under it
    args = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
            f"--object-store-memory={256 * 1024 * 1024}", f"--temp-dir={temp}",
            *(f"--{k}={v}" for k, v in ports.items())]
    head = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "the Ray dashboard never came up"
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head's session that is left
        except ProcessLookupError:
            pass


def test_submit_runs_the_tiny_recipe_to_completion(ray_head, tmp_path):
    address, env = ray_head
    out_dir = tmp_path / "job-run"
    args = [sys.executable, "-m", "launch.cli", "submit", "recipes/tiny-tracerl.yaml", "--address", address,
            "--follow", "--timeout", "400", f"output_dir={out_dir}", "trainer.total_steps=3", "trainer.mode=async",
            "trainer.max_staleness=1", "resources.placement=split", "reward.1.fn=format",
            r"reward.1.kwargs.pattern=\d"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "submitted job raysubmit_" in done.stdout and done.stdout.strip().splitlines()[-1].startswith("raysubmit_")
    assert "SUCCEEDED" in done.stdout and "step 3/3" in done.stdout  # --follow streamed the job's own log
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["rollout/staleness"] <= 1 for r in rows)
    assert rows[-1]["rollout/version"] >= 1
    assert json.loads((out_dir / "run.json").read_text())["status"] == "finished"
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_submit_rejects_a_bad_recipe_before_contacting_the_cluster(tmp_path):
    args = ["submit", "recipes/tiny-tracerl.yaml", "--address", "http://127.0.0.1:9", "model.tiny=null",
            "model.tiny_vocab=null", "model.path=/nonexistent/model"]
    done = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("diffrl: error: ")
    assert "model.path: /nonexistent/model: no such directory" in done.stderr


def test_submit_from_a_users_own_project_outside_the_checkout(ray_head, tmp_path):
    """A project directory of its own (recipe, data file, reward file, all by relative path) is the job's working
    directory; diffrl's packages travel with the job; the output says which directory was uploaded."""
    import yaml

    from launch.recipe import load_recipe
    from rl.tasks import make_task

    address, env = ray_head
    project = tmp_path / "my-project"
    (project / "conf").mkdir(parents=True)
    (project / "data").mkdir()
    rows = make_task("arithmetic", seed=0).rows("train")[:16]
    (project / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project / "conf" / "my_reward.py").write_text(
        "def score(prompt, response, reference, task, **kwargs):\n"
        "    assert task == 'arithmetic'  # a data column, by name\n"
        "    return float(response.strip().startswith(reference))\n")
    recipe = load_recipe(REPO / "recipes" / "tiny-tracerl.yaml").to_dict()
    recipe.pop("output_dir")
    recipe["name"] = "mine"
    recipe["data"].update(task=None, task_kwargs={}, train="../data/train.jsonl")  # relative to conf/
    recipe["reward"] = [{"fn": "my_reward.py:score"}]  # relative to conf/
    (project / "conf" / "mine.yaml").write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "job-run"
    args = [sys.executable, "-m", "launch.cli", "submit", "conf/mine.yaml", "--address", address, "--follow",
            "--timeout", "400", f"output_dir={out_dir}", "trainer.total_steps=2"]
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert f"working directory uploaded: {project.resolve()}" in done.stdout
    assert "SUCCEEDED" in done.stdout and "step 2/2" in done.stdout
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    saved = yaml.safe_load((out_dir / "recipe.yaml").read_text())
    assert saved["data"]["train"].endswith("/data/train.jsonl") and "my_reward.py:score" in saved["reward"][0]["fn"]
