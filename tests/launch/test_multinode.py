"""Acceptance (issue 13, scale-out shown on one machine): a Ray cluster of two nodes on 127.0.0.1 (Ray's multi-node
test cluster in a process of its own: tests/launch/two_node_cluster.py, token authentication on) runs the tiny
TraceRL recipe with the rollout worker on one node and the learner on the other (resources.rollout_node /
learner_node), the run directory on a path both see. `diffrl train --address` joins it.

1. Where each actor ran: the driver's run.json names the Ray node of every rollout worker and learner rank, and
   the operating system agrees (each actor's process is a child of its node's raylet).
2. The rollout worker's process is killed mid-run (SIGKILL): Ray restarts it on its node, the pool re-syncs it,
   the run carries on (every stored sample carries the version it was trained against).
3. The rollout node is killed (all its processes, SIGKILL): the run ends with exit status 1 and one line naming the
   lost node and the rollout worker on it, well before any restart timeout.
4. `diffrl resume` before the node is back ends at once with one line naming the missing node label; once a fresh
   rollout node joins, `diffrl resume` finishes the run, its rollout worker on the new node.
"""
from __future__ import annotations

import importlib.util
import json
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

RECIPE = cli.REPO / "recipes" / "tiny-tracerl.yaml"
CLUSTER = Path(__file__).with_name("two_node_cluster.py")
TOTAL_STEPS = 30  # steps take 0.1-0.5 s: plenty left after the worker kill for the node to be lost mid-run
OVERRIDES = [f"trainer.total_steps={TOTAL_STEPS}", "trainer.checkpoint_every=1", "trainer.keep_last=2",
             "resources.placement=split", "resources.rollout_node=rollout_node",
             "resources.learner_node=learner_node", "resources.reward_workers=1"]


@dataclass
class TwoNodes:
    proc: subprocess.Popen
    address: str
    head: dict  # {"id": node id, "raylet": pid}
    rollout: dict
    env: dict  # what a process that joins the cluster needs (its token, loopback addresses)

    def command(self, line: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return _reply(self.proc, timeout)


def _reply(proc: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"two_node_cluster.py: no answer within {timeout:.0f}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"two_node_cluster.py ended (exit {proc.wait(timeout=10)})")
    return json.loads(line)


@pytest.fixture(scope="module")
def two_nodes():
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths live under it
    env = cli.cli_env(RAY_TMPDIR=temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                      OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(CLUSTER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=temp)
    try:
        info = _reply(proc, 120)
        yield TwoNodes(proc, info["address"], info["head"], info["rollout"], env)
        proc.stdin.write("stop\n")
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        cli.kill_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _children(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _actor(cluster: TwoNodes, role: str) -> tuple[int, int]:
    """(pid, raylet pid) of the process of the `role` actor (e.g. "RolloutWorker")."""
    import psutil

    for node in (cluster.head, cluster.rollout):
        for child in _children(node["raylet"]):
            try:
                if child.name().startswith(f"ray::{role}"):
                    return child.pid, node["raylet"]
            except psutil.NoSuchProcess:
                continue
    raise AssertionError(f"no {role} process under either node's raylet")


def _latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else 0


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f}s: {log.read_text()[-3000:]}")
        time.sleep(0.02)


def _kill_rollout_worker_mid_call(cluster: TwoNodes, run: Path, proc, log: Path) -> tuple[int, int]:
    """SIGKILL the rollout worker while it generates (or, should every generation slip by between two polls,
    right after a checkpoint, while the next step syncs weights); returns (its pid, the step checkpointed then)."""
    import psutil

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        late = _latest_step(run) >= 2
        for child in _children(cluster.rollout["raylet"]):
            try:
                if child.name().startswith("ray::RolloutWorker.generate" if not late else "ray::RolloutWorker"):
                    child.kill()
                    return child.pid, _latest_step(run)
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.01)
    raise AssertionError(f"never found the rollout worker: {log.read_text()[-3000:]}")


def _placement(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["placement"]


def _on_node(placement: dict, role: str, node_id: str) -> bool:
    return [(r["node_id"], r["node_ip"]) for r in placement[role]] == [(node_id, "127.0.0.1")]


def test_two_nodes_worker_restart_node_loss_and_resume(two_nodes, tmp_path):
    from rl.store import read_store

    run, log = tmp_path / "run", tmp_path / "train.log"
    cluster = two_nodes
    assert cluster.head["id"] != cluster.rollout["id"]
    with open(log, "w") as out, open(tmp_path / "train.err", "w") as err:
        proc = subprocess.Popen([sys.executable, *cli.CLI, "train", str(RECIPE), f"output_dir={run}", *OVERRIDES,
                                 "--address", cluster.address, "-q"], cwd=tmp_path, env=cluster.env, text=True,
                                stdout=out, stderr=err, start_new_session=True)
    try:
        # 1. where each actor runs: the learner on the head (learner_node), the rollout worker on the other node
        _wait(lambda: _latest_step(run) >= 1, proc, 180, "first checkpoint", tmp_path / "train.err")
        placement = _placement(run)
        assert _on_node(placement, "rollout", cluster.rollout["id"]), placement
        assert _on_node(placement, "learner", cluster.head["id"]), placement
        assert _actor(cluster, "LearnerWorker")[1] == cluster.head["raylet"]
        assert _actor(cluster, "RolloutWorker")[1] == cluster.rollout["raylet"]

        # 2. the rollout worker's process dies: Ray restarts it on its node, the run carries on
        killed, at = _kill_rollout_worker_mid_call(cluster, run, proc, tmp_path / "train.err")
        _wait(lambda: _latest_step(run) >= at + 2, proc, 120, "two checkpoints after the kill",
              tmp_path / "train.err")  # the restarted worker generated (and was synced) at least once
        restarted = _actor(cluster, "RolloutWorker")
        assert restarted[0] != killed and restarted[1] == cluster.rollout["raylet"]
        assert _on_node(_placement(run), "rollout", cluster.rollout["id"])

        # 3. the rollout node dies: one line naming it, exit status 1, well before the 300 s restart timeout
        lost_at = _latest_step(run)
        assert lost_at < TOTAL_STEPS, "the run finished before the node could be lost"
        cluster.command("remove rollout")
        removed = time.monotonic()
        proc.wait(timeout=120)
        ended_after = time.monotonic() - removed
    finally:
        cli.kill_group(proc.pid)
    stderr = (tmp_path / "train.err").read_text()
    assert proc.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("diffrl: error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line = errors[0]
    assert f"node lost: node {cluster.rollout['id'][:8]} (127.0.0.1) left the Ray cluster, with rollout worker 0" \
           f" on it" in line, line
    assert f"`diffrl resume {run}`" in line and "learner rank" not in line, line
    assert ended_after < 60, f"the run took {ended_after:.0f}s to notice the lost node"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and "node lost" in status["error"]
    stopped = _latest_step(run)
    assert lost_at <= stopped < TOTAL_STEPS

    # 4. resumed before the node is back: one line naming the missing label, nothing changed; then a fresh rollout
    #    node joins and `diffrl resume` finishes the run there
    early = cli.run_cli("resume", str(run), "--address", cluster.address, "-q", cwd=tmp_path, env=cluster.env,
                        timeout=120)
    assert early.returncode == 2, early.stderr[-3000:]
    assert early.stderr.strip().splitlines()[-1].startswith(
        "diffrl: error: resources.rollout_node: no node of the Ray cluster advertises the resource 'rollout_node'")
    assert _latest_step(run) == stopped
    cluster.rollout = cluster.command("add rollout")["rollout"]
    done = cli.run_cli("resume", str(run), "--address", cluster.address, "-q", cwd=tmp_path, env=cluster.env,
                       timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == TOTAL_STEPS
    assert _on_node(status["placement"], "rollout", cluster.rollout["id"])
    assert _on_node(status["placement"], "learner", cluster.head["id"])
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))  # rows past the checkpoint rewound
    # every sample was generated with the weights of the step before it: the restarted worker (and the workers
    # after the resume) were brought to the current version before generating
    store = read_store(run / "store")
    assert store.num_rows == 16 * TOTAL_STEPS
    assert all(v == s - 1 for s, v in zip(store["step"], store["version"], strict=True))
