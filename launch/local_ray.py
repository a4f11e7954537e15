"""Starting (or joining) Ray for a run.

    with ray_session(recipe.ray):
        ...  # ray.* available

- Inside a Ray job (`diffrl submit`: RAY_ADDRESS is set) or with `ray.address` in the recipe (`--address`): connect
  to it. An address on 127.0.0.1 (a test cluster of several nodes on this machine) is reached on 127.0.0.1: Ray
  would otherwise swap it for the machine's network address, where nothing listens.
- Otherwise: a private local cluster bound to 127.0.0.1 only (no dashboard, object store capped), stopped on
  exit; never a cluster already running on the machine (a plain ray.init() joins the one `ray start` last
  recorded in /tmp/ray). It uses token authentication with a fresh random token held in this process's
  environment (inherited by the cluster's processes), so nothing is written to ~/.ray and nothing on the machine
  can submit to it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
from typing import Iterator

log = logging.getLogger(__name__)

LOCAL_IP = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost")
DEFAULT_OBJECT_STORE_MB = 200
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def _local_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)


@contextlib.contextmanager
def ray_session(ray_cfg=None, *, num_cpus: int | None = None, verbose: bool = True) -> Iterator[bool]:
    """Yield True when this call started a local cluster (and will stop it), False when it joined one.
    verbose=False (`diffrl train` without --verbose): the actors' stdout/stderr (Ray, DeepSpeed, transformers
    chatter) stay in Ray's session logs instead of the console; their errors still reach the driver as
    exceptions."""
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if not address:
        _local_env()  # before Ray reads its config: the auth mode is fixed at its first use in this process
    elif address.rpartition(":")[0] in LOOPBACK:  # read when Ray is imported: keep 127.0.0.1 as it is
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    if address:
        log.info("joining the Ray cluster at %s", address)
        # A Ray job's log (`diffrl submit`: RAY_ADDRESS set) is where its actors' output belongs; `diffrl train
        # --address` at a terminal shows it with --verbose, as a local cluster does.
        ray.init(address=address, log_to_driver=verbose or bool(os.environ.get("RAY_ADDRESS")))
        try:
            yield False
        finally:
            ray.shutdown()
        return
    cpus = num_cpus or getattr(ray_cfg, "num_cpus", None) or os.cpu_count() or 1
    store_mb = getattr(ray_cfg, "object_store_mb", None) or DEFAULT_OBJECT_STORE_MB
    ray.init(
        address="local",  # a new cluster, never the one `ray start` last recorded on this machine
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=store_mb * 1024 * 1024,
        _node_ip_address=LOCAL_IP,
        log_to_driver=verbose,
        configure_logging=True,
        logging_level=logging.WARNING if verbose else logging.ERROR,
    )
    try:
        yield True
    finally:
        ray.shutdown()
