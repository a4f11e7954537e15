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


# The files that take minutes, longest first. README's command runs the suite on two pytest-xdist workers, one file
# at a time each (`--dist loadfile`, collection order kept); a file this long left for the end would run alone while
# the other worker idles (measured: the 5-minute held-out test last made the suite 1.45x faster than serial, first
# ~1.7x). Stale entries cost nothing: the order only changes when the suite finishes, never what it checks.
LONGEST_FILES = (
    "tests/launch/test_learns_heldout.py",
    "tests/launch/test_multinode.py",
    "tests/launch/test_demo.py",
    "tests/launch/test_driver.py",
    "tests/launch/test_driver_submit.py",
    "tests/launch/test_learns.py",
)


def _start_rank(item) -> tuple[int, int]:
    path = item.path.relative_to(item.config.rootpath).as_posix()
    if path in LONGEST_FILES:
        return 0, LONGEST_FILES.index(path)
    return (1, 0) if item.get_closest_marker("slow") else (2, 0)


def pytest_collection_modifyitems(config, items):
    """Long files first, then files with end-to-end (`slow`) tests, then the rest; stable within each group, so a
    file's tests keep their order."""
    file_rank: dict = {}
    for item in items:
        rank = _start_rank(item)
        file_rank[item.path] = min(file_rank.get(item.path, rank), rank)
    items.sort(key=lambda item: file_rank[item.path])
