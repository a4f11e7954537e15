"""Shared fixtures: tiny offline models built once per test session."""
from __future__ import annotations

import os

import pytest

# Tests never reach a hub, never report usage, and keep Ray on loopback.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a shared 2-core box two threads per process
    oversubscribe the cores (measured ~10x slower under load). Ray workers and subprocesses set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Paths of tiny random checkpoints, one per kind: block, sdar, llada, dream."""
    from rollout.models.tiny import make_tiny_policy

    _quiet_transformers()
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: make_tiny_policy(kind, root / kind, seed=1) for kind in ("block", "sdar", "llada", "dream")}


@pytest.fixture(scope="session")
def tiny_policies(tiny_model_dirs):
    """Loaded tiny policies (shared: tests must not modify their weights)."""
    from rollout.models.loading import load_policy

    return {kind: load_policy(path) for kind, path in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def local_ray():
    """An in-process Ray cluster of this machine alone (127.0.0.1, 2 CPUs, 200 MB object store), one per test
    module; `address="local"` never attaches to another Ray instance running on the box. Yields the ray module."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("local_ray: Ray is already initialised in this process (a test left it running)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray
    ray.shutdown()
