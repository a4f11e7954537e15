"""Which torch device an actor computes on: chosen here, once, inside the actor.

    device = actor_device("auto")        # in a RolloutWorker / LearnerWorker, after Ray placed it
    choose_device("auto", gpu_ids=[0], accelerator="cuda", accelerator_available=True)   # the pure rule

The rule (`choose_device`), from what the recipe asks (`resources.device`: auto | cpu | cuda) and what the actor got:
- "cpu": the CPU, whatever Ray assigned.
- "auto": the accelerator when Ray assigned this actor GPU ids (resources.gpus_per_worker > 0), else the CPU.
  Outside Ray (a test or script driving a worker directly) torch's own view decides: CUDA when it sees a device.
- "cuda": the accelerator; an actor Ray gave no GPU, or a process where torch sees no CUDA device, is an error.
Ray assigned GPUs that torch cannot use (a CPU build of torch, a driver problem) is an error under "auto" too: an 8B
model silently decoding on the CPU of a GPU node is the failure this module exists to prevent. Inside a Ray actor
CUDA_VISIBLE_DEVICES holds exactly the assigned GPUs, so the accelerator is `cuda` (its first visible device).

Test hook: ACCELERATOR_ENV (`DIFFRL_TEST_ACCELERATOR=<torch device type>`, e.g. `meta`) makes that device type stand
in for CUDA: available, and what "auto"/"cuda" resolve to when Ray assigned GPU ids. A CPU-only machine fakes GPUs
with `ray.init(num_gpus=N)` and sets the variable in the actors' runtime_env, so the actors' real code paths (model
loaded there, caches allocated there) run against a device that is not the CPU (tests/launch/test_placement_ray.py).
Never set in a real run. Only the standard library is imported at module level (recipe checks use `check_request`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from rollout.errors import OneLineError

__all__ = ["DEVICES", "ACCELERATOR_ENV", "DeviceError", "choose_device", "actor_device", "assigned_gpu_ids",
           "accelerator", "uses_accelerator", "default_dtype", "check_request", "tensor_devices", "actor_node"]

DEVICES = ("auto", "cpu", "cuda")
ACCELERATOR_ENV = "DIFFRL_TEST_ACCELERATOR"


class DeviceError(OneLineError):
    """A device that cannot be had; one line naming the recipe field."""


def uses_accelerator(requested: str, gpus_per_worker: float) -> bool:
    """What a recipe's placement resolves to before Ray starts: True when its actors will run on the accelerator
    (the GPU defaults apply: bf16 weights, the KV cache)."""
    return requested == "cuda" or (requested == "auto" and gpus_per_worker > 0)


def default_dtype(on_accelerator: bool) -> str:
    """The weights' dtype when a recipe (or an eval run) names none: bfloat16 on accelerators, float32 on CPU."""
    return "bfloat16" if on_accelerator else "float32"


def check_request(requested: str, gpus_per_worker: float) -> str | None:
    """None, or the one-line problem with a recipe's device request (checked before Ray starts)."""
    if requested not in DEVICES:
        return f"resources.device: {requested!r} is not one of {', '.join(DEVICES)}"
    if requested == "cuda" and gpus_per_worker <= 0:
        return ("resources.device: 'cuda' requested but resources.gpus_per_worker is 0 (Ray gives the actors no GPU); "
                "set resources.gpus_per_worker > 0 or resources.device: cpu")
    return None


def choose_device(requested: str, gpu_ids: Sequence[Any] | None, *, accelerator: str = "cuda",
                  accelerator_available: bool = False) -> str:
    """The device type an actor computes on (the module doc's rule). `gpu_ids`: what Ray assigned this actor
    (ray.get_gpu_ids()); None outside Ray. `accelerator`: the torch device type standing for a GPU ("cuda", or the
    test hook's); `accelerator_available`: whether torch can use it in this process."""
    problem = check_request(requested, 1.0)
    if problem is not None:
        raise DeviceError(problem)
    if requested == "cpu":
        return "cpu"
    if gpu_ids is None:  # not a Ray actor: this process's own view of the machine
        if accelerator_available:
            return accelerator
        if requested == "cuda":
            raise DeviceError(f"resources.device: 'cuda' requested but torch sees no {accelerator} device")
        return "cpu"
    if not gpu_ids:
        if requested == "cuda":
            raise DeviceError("resources.device: 'cuda' requested but Ray assigned this actor no GPU "
                              "(resources.gpus_per_worker)")
        return "cpu"
    if not accelerator_available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(f"resources.device: Ray assigned GPU ids {list(gpu_ids)} but torch cannot use "
                          f"{accelerator} (CUDA_VISIBLE_DEVICES={visible!r}; a CPU build of torch?); install a CUDA "
                          "torch or set resources.gpus_per_worker: 0")
    return accelerator


def accelerator() -> tuple[str, bool]:
    """(device type standing for a GPU, whether torch can use it here): ("cuda", torch.cuda.is_available()), or the
    test hook's device type, always available."""
    fake = os.environ.get(ACCELERATOR_ENV)
    if fake:
        import torch

        try:
            kind = torch.device(fake).type
        except RuntimeError:
            raise DeviceError(f"{ACCELERATOR_ENV}: {fake!r} is not a torch device type") from None
        return kind, True
    import torch

    return "cuda", torch.cuda.is_available()


def assigned_gpu_ids() -> list[Any] | None:
    """The GPU ids Ray assigned this process (an actor's own; [] for none), or None when not running under Ray."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return list(ray.get_gpu_ids())


def actor_device(requested: str = "auto"):
    """The torch.device this process computes on: choose_device over Ray's assignment and torch's view."""
    import torch

    kind, available = accelerator()
    return torch.device(choose_device(requested, assigned_gpu_ids(), accelerator=kind,
                                      accelerator_available=available))


def actor_node() -> dict[str, str | None]:
    """The Ray node this process runs on: {"node_id", "node_ip"} (both None outside Ray). Two nodes of one machine
    (a test cluster on 127.0.0.1) share an address, not an id."""
    try:
        import ray
    except ImportError:
        return {"node_id": None, "node_ip": None}
    if not ray.is_initialized():
        return {"node_id": None, "node_ip": None}
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def tensor_devices(*modules) -> list[str]:
    """Sorted device names of every parameter and buffer of `modules` (None skipped): what a placement report
    says a model lives on."""
    found = set()
    for module in modules:
        if module is None:
            continue
        found |= {str(t.device) for t in module.parameters()} | {str(t.device) for t in module.buffers()}
    return sorted(found)
