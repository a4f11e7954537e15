"""Multi-node placement and node loss without a cluster (the two-node run itself: tests/launch/test_multinode.py):
which bundles carry which node label, what a recipe may say, how a lost node is told apart from other failures and
named in one line, and how `diffrl train --address` and a node loss reach the command line."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch import cli
from launch.cluster_nodes import NodeLostError, NodeWatch, actor_roles, describe_loss, node_loss_line
from launch.driver_setup import NODE_LABEL_SHARE, missing_node_labels, placement_plan
from launch.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-tracerl.yaml"
BASE = {"name": "t", "model": {"tiny": "qwen3-block"}, "algorithm": "tracerl", "reward": [{"fn": "math"}],
        "data": {"task": "arithmetic", "num_prompts_per_step": 2}, "rollout": {"max_tokens": 16, "num_workers": 2}}
HEAD, OTHER = "a" * 56, "b" * 56


def _recipe(**resources):
    return recipe_from_dict({**BASE, "learner": {"num_workers": 2, "backend": "deepspeed"},
                             "resources": {"gpus_per_worker": 1, **resources}})


# ------------------------------------------------------------------------------------------------- placement
def test_labels_go_to_their_roles_bundles_only():
    plan = placement_plan(_recipe(placement="split", rollout_node="rollout_node", learner_node="gpu-big"))
    assert plan.rollout_bundles == [0, 1] and plan.learner_bundles == [2, 3]
    assert [plan.bundles[i] for i in plan.rollout_bundles] == [{"CPU": 1, "GPU": 1,
                                                                "rollout_node": NODE_LABEL_SHARE}] * 2
    assert [plan.bundles[i] for i in plan.learner_bundles] == [{"CPU": 1, "GPU": 1, "gpu-big": NODE_LABEL_SHARE}] * 2
    assert plan.node_labels == {"rollout": "rollout_node", "learner": "gpu-big"} and plan.strategy == "PACK"


def test_one_label_or_none_leaves_the_other_bundles_free():
    only_rollout = placement_plan(_recipe(placement="split", rollout_node="r"))
    assert [set(b) for b in only_rollout.bundles] == [{"CPU", "GPU", "r"}] * 2 + [{"CPU", "GPU"}] * 2
    plain = placement_plan(_recipe(placement="split"))
    assert plain.bundles == [{"CPU": 1, "GPU": 1}] * 4 and plain.node_labels == {}


def test_a_label_the_cluster_lacks_is_named_before_placing():
    plan = placement_plan(_recipe(placement="split", rollout_node="rollout_node", learner_node="learner_node"))
    assert missing_node_labels(plan, {"CPU": 8, "GPU": 2, "rollout_node": 1, "learner_node": 1}) is None
    problem = missing_node_labels(plan, {"CPU": 8, "rollout_node": 1, "node:10.0.0.1": 1})
    assert problem.startswith("resources.learner_node: no node of the Ray cluster advertises the resource "
                              "'learner_node'") and "(the cluster has: CPU, rollout_node)" in problem
    assert "\n" not in problem


@pytest.mark.parametrize("resources, message", [
    ({"placement": "colocated", "rollout_node": "r"}, "resources.rollout_node: only for placement 'split'"),
    ({"placement": "split", "learner_node": "GPU"}, "resources.learner_node: 'GPU' is one of Ray's own resources"),
    ({"placement": "split", "rollout_node": "node:10.0.0.1"}, "resources.rollout_node"),
])
def test_bad_labels_fail_in_one_line(resources, message):
    with pytest.raises(RecipeError) as info:
        _recipe(**resources)
    assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ node loss
def _polls(*answers):
    """A fake node list: each call returns the next answer (the last one forever)."""
    seen = []

    def poll():
        seen.append(1)
        return answers[min(len(seen), len(answers)) - 1]
    return poll, seen


def _watch(at_start=None):
    placement = {"rollout": [{"node_id": OTHER, "node_ip": "10.0.0.2"}],
                 "learner": [{"node_id": HEAD, "node_ip": "10.0.0.1"}, {"node_id": OTHER, "node_ip": "10.0.0.2"}]}
    return NodeWatch(at_start or {HEAD: "10.0.0.1", OTHER: "10.0.0.2"}, roles=lambda: actor_roles(placement))


def test_an_actor_error_waits_for_ray_to_declare_the_node_dead():
    from ray.exceptions import ActorUnavailableError

    poll, seen = _polls({HEAD: "10.0.0.1", OTHER: "10.0.0.2"}, {HEAD: "10.0.0.1", OTHER: "10.0.0.2"},
                        {HEAD: "10.0.0.1"})
    lost = _watch().explain(ActorUnavailableError("restarting", None), poll=poll, grace_s=5, interval_s=0.01)
    assert len(seen) == 3  # the node list was read until the node was gone
    assert lost == "node bbbbbbbb (10.0.0.2) left the Ray cluster, with rollout worker 0 and learner rank 1 on it"


def test_other_failures_are_not_node_losses_and_do_not_wait():
    from ray.exceptions import ActorDiedError

    alive = {HEAD: "10.0.0.1", OTHER: "10.0.0.2"}
    poll, seen = _polls(alive)
    assert _watch().explain(ValueError("a reward bug"), poll=poll, grace_s=60) is None and len(seen) == 1
    poll, seen = _polls(alive)  # an actor died, every node alive: waits out the grace only, then None
    assert _watch().explain(ActorDiedError(), poll=poll, grace_s=0.05, interval_s=0.01) is None and len(seen) > 1
    poll, seen = _polls({HEAD: "10.0.0.1"})  # one node: nothing to wait for
    assert _watch({HEAD: "10.0.0.1"}).explain(ActorDiedError(), poll=poll, grace_s=60) is None and len(seen) == 1


def test_a_lost_node_is_named_whatever_the_error_and_a_node_lost_error_as_it_is():
    poll, _ = _polls({HEAD: "10.0.0.1"})
    assert "node bbbbbbbb (10.0.0.2) left" in _watch().explain(RuntimeError("gloo: connection reset"), poll=poll)
    err = NodeLostError("node cccccccc (10.0.0.3) left the Ray cluster")
    assert _watch().explain(err, poll=lambda: pytest.fail("not read")) == str(err)


def test_an_unreadable_node_list_leaves_the_error_as_it_is():
    from ray.exceptions import ActorDiedError, RaySystemError

    def gone():
        raise RaySystemError("GCS unreachable")
    assert _watch().explain(ActorDiedError(), poll=gone, grace_s=60) is None


def test_describe_loss_and_the_last_line(tmp_path):
    assert describe_loss({OTHER: "10.0.0.2", HEAD: "10.0.0.1"}, {"learner rank 0": HEAD}) == (
        "node aaaaaaaa (10.0.0.1) left the Ray cluster, with learner rank 0 on it; "
        "node bbbbbbbb (10.0.0.2) left the Ray cluster")
    assert "(no checkpoint yet)" in node_loss_line("x", 0, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000004\n")
    assert node_loss_line("node bbbbbbbb (10.0.0.2) left the Ray cluster", 5, tmp_path) == (
        f"node lost: node bbbbbbbb (10.0.0.2) left the Ray cluster; the run stopped after step 5 (checkpoint "
        f"step_000004 kept): `diffrl resume {tmp_path}` continues once the cluster has such a node again")


# ------------------------------------------------------------------------------------------------ command line
def test_train_address_joins_and_a_node_loss_exits_1_in_one_line(monkeypatch, capsys, tmp_path):
    import launch.driver

    seen = {}

    def fake_run(recipe, **kwargs):
        seen["recipe"] = recipe
        raise NodeLostError("node lost: node bbbbbbbb (10.0.0.2) left the Ray cluster")

    monkeypatch.setattr(launch.driver, "run_training", fake_run)
    code = cli.main(["train", str(RECIPE), f"output_dir={tmp_path / 'run'}", "--address", "10.0.0.1:6379", "-q"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "diffrl: error: node lost: node bbbbbbbb (10.0.0.2) left the Ray cluster")
    ray_section = seen["recipe"].ray
    assert (ray_section.address, ray_section.num_cpus, ray_section.object_store_mb) == ("10.0.0.1:6379", None, None)
    assert load_recipe(RECIPE).ray.num_cpus == 2  # without --address the recipe's local cluster size stands
