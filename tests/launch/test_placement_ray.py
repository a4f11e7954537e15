"""Acceptance (issue 16, placement): with accelerators reported by Ray, the rollout engine and the learner (policy,
reference, value model) are built on the accelerator; with none, on the CPU. Each actor reports the devices its
model and caches live on (RolloutWorker.placement / LearnerWorker.placement).

This machine has no CUDA: Ray fakes GPUs (`num_gpus=2`: actors get GPU ids and CUDA_VISIBLE_DEVICES), and the test
hook of rollout/devices.py (DIFFRL_TEST_ACCELERATOR=meta, set in every actor's environment) makes torch's `meta`
device stand in for CUDA. Everything else is the driver's own path: recipe -> placement plan -> placement group ->
RolloutPool / make_learner -> each actor resolves its device and loads its models there.
"""
from __future__ import annotations

import pytest

from launch.driver_roles import RolloutPool, make_learner
from launch.driver_setup import create_placement_group, placement_plan
from launch.recipe import recipe_from_dict
from rollout.devices import ACCELERATOR_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_with_fake_gpus():
    import ray

    if ray.is_initialized():
        raise RuntimeError("ray_with_fake_gpus: Ray is already initialised in this process (a test left it running)")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       ACCELERATOR_ENV: "meta"}})
    yield ray
    ray.shutdown()


def _recipe(model_dir, *, gpus: float, placement: str):
    return recipe_from_dict({
        "name": "placement", "model": {"path": str(model_dir), "kind": "block"},
        "algorithm": {"name": "tracerl", "beta": 0.01, "kl_reference": "ref",  # a reference model
                      "value_model": {"trunk": "separate", "path": str(model_dir)}},  # a separate value model
        "reward": [{"fn": "math"}], "data": {"task": "arithmetic", "num_prompts_per_step": 1},
        "rollout": {"max_tokens": 8, "samples_per_prompt": 2, "batch_size": 2},
        "learner": {"backend": "torch"}, "resources": {"gpus_per_worker": gpus, "placement": placement},
    })


def _build(recipe, model_dir):
    plan = placement_plan(recipe)
    group = create_placement_group(plan, timeout_s=60)
    pool = RolloutPool(recipe, model_dir, group, plan)
    learner = make_learner(recipe, group, plan, start_policy_dir=model_dir, initial_policy_dir=model_dir)
    return group, pool, learner


def _teardown(ray, group, pool, learner) -> None:
    from ray.util.placement_group import remove_placement_group

    learner.shutdown()
    pool.shutdown()
    remove_placement_group(group)


@pytest.mark.parametrize("gpus, placement, device", [(1, "split", "meta"), (0, "colocated", "cpu")])
def test_each_actor_computes_where_ray_placed_it(ray_with_fake_gpus, tiny_model_dirs, gpus, placement, device):
    ray = ray_with_fake_gpus
    model_dir = tiny_model_dirs["block"]
    recipe = _recipe(model_dir, gpus=gpus, placement=placement)
    dtype = "bfloat16" if gpus else "float32"  # the placement's default weights
    assert recipe.model.dtype == dtype
    group, pool, learner = _build(recipe, model_dir)
    try:
        rollout = ray.get([w.placement.remote() for w in pool.workers])
        ranks = learner.placement()
    finally:
        _teardown(ray, group, pool, learner)
    nodes = {(report.pop("node_id"), report.pop("node_ip")) for report in rollout + ranks}
    assert nodes == {(ray.get_runtime_context().get_node_id(), "127.0.0.1")}  # this cluster's only node
    gpu_ids = [report.pop("gpu_ids") for report in rollout + ranks]
    assert sorted(map(len, gpu_ids)) == [gpus, gpus] and (not gpus or gpu_ids[0] != gpu_ids[1])  # split: own GPUs
    assert rollout == [{"device": device, "model": [device], "dtype": dtype, "kv_cache": [device],
                        "kv_cache_mode": "block" if gpus else "none"}]
    assert ranks == [{"device": device, "policy": [device], "dtype": dtype, "reference": [device],
                      "value": [device]}]
    assert learner.master_addr == "127.0.0.1"  # rank 0's node address (this cluster's only node)
