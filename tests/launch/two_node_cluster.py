"""A two-node Ray cluster on 127.0.0.1 in a process of its own, driven line by line over stdin/stdout (tests/launch/
test_multinode.py). Ray's multi-node test cluster (ray.cluster_utils.Cluster) starts one raylet per "node", all on
this machine: a head node advertising the custom resource `learner_node` and a second node advertising
`rollout_node`, the labels a recipe's resources.learner_node / rollout_node name.

    python two_node_cluster.py            -> {"address": "127.0.0.1:PORT", "head": NODE, "rollout": NODE}
    stdin "remove rollout"                -> the rollout node's processes are SIGKILLed (a crashed machine)
    stdin "add rollout"                   -> a fresh rollout node joins: {"rollout": NODE}
                                             NODE: {"id": Ray's node id, "raylet": its raylet's pid}
    stdin "stop" (or end of input)        -> every node is stopped

Why a separate process: the cluster's environment (token authentication, RAY_TMPDIR) stays out of the test process,
and Cluster writes the "current cluster" address file into RAY_TMPDIR (the caller gives a private one), where a
plain `ray.init()` elsewhere on the machine would otherwise find and join it. Health checks are tightened so that
a killed node is declared dead within seconds.
"""
from __future__ import annotations

import json
import sys

HEAD_CPUS = 2  # learner rank (1 CPU) + one reward worker; the trajectory store takes none
ROLLOUT_CPUS = 1  # one rollout worker
# a node is declared dead ~5 s after it stops answering (Ray's defaults: ~15-30 s); still lenient enough that a
# loaded 2-core machine does not lose a live node
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                      "health_check_timeout_ms": 3000, "health_check_failure_threshold": 5}
NODE_ARGS = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _node(node) -> dict:
    """The node's id and its raylet's pid (the actors of a node are the raylet's child processes)."""
    from ray._private import ray_constants

    return {"id": node.node_id, "raylet": node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid}


def _rollout_node(cluster):
    return cluster.add_node(num_cpus=ROLLOUT_CPUS, resources={"rollout_node": 1}, **NODE_ARGS)


def main() -> int:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "resources": {"learner_node": 1}, "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS, **NODE_ARGS})
    rollout = _rollout_node(cluster)
    cluster.wait_for_nodes()
    _say(address=cluster.address, head=_node(cluster.head_node), rollout=_node(rollout))
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "remove rollout":
                cluster.remove_node(rollout, allow_graceful=False)
                _say(removed=rollout.node_id)
            elif command == "add rollout":
                rollout = _rollout_node(cluster)
                cluster.wait_for_nodes()
                _say(rollout=_node(rollout))
            elif command == "stop":
                break
            else:
                _say(error=f"unknown command {command!r}")
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
