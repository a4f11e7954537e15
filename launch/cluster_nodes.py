"""Which Ray node each of a run's actors sits on, and the one line a run ends with when a node leaves the cluster.

    watch = NodeWatch(alive_nodes(), roles=lambda: actor_roles(driver.placement()))   # at the driver's start
    lost = watch.explain(err)         # when the run fails: "node 7255bc51 (10.0.0.7) left the Ray cluster, with
                                      # rollout worker 0 on it", or None when every node is still there
    raise NodeLostError(node_loss_line(lost, step, run_dir)) from err

A rollout worker whose process dies is restarted by Ray on its node and re-synced (launch/driver_roles.RolloutPool;
its wait for the restart raises NodeLostError itself when the worker's node is gone). A node that dies takes every
actor on it, and the run does not carry on without them: learner ranks hold optimizer state that exists nowhere
else, and a rollout worker whose labelled node is gone has nowhere to be restarted. The run ends with one line
naming the node and the roles that were on it; `diffrl resume RUN_DIR` continues from the last checkpoint once the
cluster has such a node again (docs/MULTINODE.md).

Ray declares a node dead after its health checks fail (Ray's defaults: ~15-30 s after a machine stops answering);
an actor on it may fail before that, so a Ray error is held for up to `grace_s` while the node list catches up.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rollout.errors import OneLineError, one_line

log = logging.getLogger(__name__)

NODE_DEATH_GRACE_S = 45.0  # Ray's default health checks declare a dead node within ~30 s


class NodeLostError(OneLineError):
    """A node of the run's cluster left mid-run; one line naming it and what ran there."""


def alive_nodes() -> dict[str, str]:
    """node id -> address of every node the Ray cluster holds alive now."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def describe_loss(lost: dict[str, str], roles: dict[str, str | None]) -> str:
    """'node 7255bc51 (127.0.0.1) left the Ray cluster, with rollout worker 0 on it', for each lost node."""
    parts = []
    for node_id, address in sorted(lost.items()):
        on_it = [role for role, where in roles.items() if where == node_id]
        held = f", with {' and '.join(on_it)} on it" if on_it else ""
        parts.append(f"node {node_id[:8]} ({address}) left the Ray cluster{held}")
    return "; ".join(parts)


def actor_roles(placement: dict[str, list]) -> dict[str, str | None]:
    """{"rollout worker 0": node id, "learner rank 0": node id, ...} from the driver's placement record."""
    names = {"rollout": "rollout worker", "learner": "learner rank"}
    return {f"{names[role]} {i}": (node or {}).get("node_id") for role, nodes in placement.items()
            for i, node in enumerate(nodes)}


def node_loss_line(lost: str, step: int, run_dir: Path) -> str:
    """The run's last words after a node loss: what was lost, where the run stands, how to continue."""
    latest = run_dir / "checkpoints" / "latest"
    kept = f"checkpoint {latest.read_text().strip()} kept" if latest.is_file() else "no checkpoint yet"
    return (f"node lost: {lost}; the run stopped after step {step} ({kept}): `diffrl resume {run_dir}` "
            "continues once the cluster has such a node again")


@dataclass
class NodeWatch:
    """The nodes a run started on and a view of where its actors are (`roles`: role name -> node id, read when
    asked, so restarted actors count where they are now)."""

    at_start: dict[str, str]
    roles: Callable[[], dict[str, str | None]] = field(default=dict)

    def lost_nodes(self, alive: dict[str, str]) -> dict[str, str]:
        return {node: address for node, address in self.at_start.items() if node not in alive}

    def explain(self, err: BaseException, *, poll: Callable[[], dict[str, str]] = alive_nodes,
                grace_s: float = NODE_DEATH_GRACE_S, interval_s: float = 0.5) -> str | None:
        """The node loss behind `err` (describe_loss), or None when every node the run started with is alive. A
        NodeLostError names its loss itself. An actor or object lost on a multi-node cluster waits up to grace_s
        for Ray to declare its node dead (on one node, or for any other error, the nodes are read once)."""
        if isinstance(err, NodeLostError):
            return str(err)
        wait = grace_s if len(self.at_start) > 1 and _lost_with_a_node(err) else 0.0
        deadline = time.monotonic() + wait
        while True:
            try:
                lost = self.lost_nodes(poll())
            except _unreadable_errors() as unreadable:  # the cluster itself is gone (its head, its GCS)
                log.warning("cannot read the Ray node list (%s): %s stands", one_line(unreadable, 200),
                            type(err).__name__)
                return None
            if lost:
                return describe_loss(lost, self.roles())
            if time.monotonic() >= deadline:
                return None
            time.sleep(interval_s)


def _lost_with_a_node(err: BaseException) -> bool:
    """Whether `err` is how Ray reports an actor, worker or object that a dying node takes with it (an exception
    raised by the code inside an actor, RayTaskError, is not)."""
    try:
        from ray import exceptions as rx
    except ImportError:
        return False
    return isinstance(err, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
                            rx.LocalRayletDiedError))


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What reading the node list raises when the cluster cannot answer."""
    from ray.exceptions import RayError

    return ConnectionError, TimeoutError, RuntimeError, RayError
