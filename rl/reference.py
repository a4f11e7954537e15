"""Where the frozen KL reference model lives: on the learner's device (default), in host memory between its
forward passes (`LearnerConfig.offload_reference`), or partitioned over the ranks by DeepSpeed ZeRO-3.

The reference only runs forwards before training (rl.learner: one pass per micro-batch slot, under no_grad), so
its weights need not sit on the accelerator through the backward passes and optimizer steps:
- offloaded: kept on the CPU, moved to the learner's device for the reference passes of an update and back after
  (one host-device round trip of the weights per update, none of its memory held while training);
- ZeRO-3: an inference-only DeepSpeed engine (no optimizer) partitions its weights as the policy's are, each rank
  holding 1/world of them and gathering a layer's weights as its forward reaches it. Its forwards are then
  collective: every rank runs the same number (the learner pads, as for the policy). With offload as well,
  DeepSpeed keeps the partitions in host memory (offload_param: cpu).
"""
from __future__ import annotations

import contextlib

import torch

HOST = torch.device("cpu")


def place_reference(ref_policy, config, backend, *, need_ref: bool):
    """Put the learner's reference where `config` says (see the module doc); returns the ZeRO-3 engine that
    partitions it, or None. ref_policy None: no separate reference (none needed, or LoRA's adapters-off base)."""
    if config.offload_reference and ref_policy is None:
        why = "its reference is its own base (adapters off)" if need_ref else "this run has no reference model"
        raise ValueError(f"learner.offload_reference: nothing to offload, {why}")
    if ref_policy is None:
        return None
    if config.backend == "deepspeed" and config.zero_stage == 3:
        return partition_reference(ref_policy.model, world_size=backend.world_size, bf16=config.bf16,
                                   offload=config.offload_reference)
    if config.offload_reference:
        ref_policy.model.to(HOST)
    return None


def partition_reference(module: torch.nn.Module, *, world_size: int, bf16: bool, offload: bool):
    """Partition a frozen module with ZeRO-3 (no optimizer); returns the engine (keep it alive: it owns the
    hooks that gather the weights). The module is used as before; its forwards are collective across ranks."""
    import deepspeed

    zero = {"stage": 3, "overlap_comm": False, "contiguous_gradients": False}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world_size, "zero_optimization": zero,
              "bf16": {"enabled": bool(bf16)}, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def reference_on_device(module: torch.nn.Module | None, device: torch.device, *, offload: bool):
    """The reference on `device` for the duration (offload: from host memory, back to it after)."""
    if module is None or not offload:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(HOST)


def check_ref_sync(config, ref_policy, lora: bool, ref_engine) -> None:
    """learner.ref_sync_steps / ref_sync_alpha: refused (one line) where there is no separate reference to sync."""
    steps, alpha = config.ref_sync_steps, config.ref_sync_alpha
    if steps < 0 or not 0.0 < alpha <= 1.0:
        raise ValueError(f"learner.ref_sync_steps / ref_sync_alpha: need steps >= 0 and 0 < alpha <= 1, got "
                         f"{steps}, {alpha}")
    if not steps:
        return
    if lora:
        raise ValueError("learner.ref_sync_steps: a LoRA policy's reference is its own base with the adapters off; "
                         "there is no reference model to re-sync (TRL's SyncRefModelCallback does nothing there)")
    if ref_policy is None:
        raise ValueError("learner.ref_sync_steps: this run has no reference model (no KL to a reference)")
    if ref_engine is not None:
        raise ValueError("learner.ref_sync_steps: not built for a ZeRO-3 partitioned reference")


@torch.no_grad()
def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float, gathered) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref for every parameter (alpha 1: a copy); `gathered` is the
    backend's context that makes the policy's parameters whole (ZeRO-3; a no-op otherwise)."""
    ref_params = dict(reference.named_parameters())
    pol_params = dict(policy.named_parameters())
    if set(ref_params) != set(pol_params):
        odd = sorted(set(ref_params) ^ set(pol_params))[0]
        raise ValueError(f"reference sync: parameter {odd!r} is not in both the policy and the reference")
    with gathered(list(pol_params.values())):
        for name, ref in ref_params.items():
            new = pol_params[name].detach().to(device=ref.device, dtype=ref.dtype)
            if alpha == 1.0:
                ref.copy_(new)
            else:
                ref.mul_(1.0 - alpha).add_(new, alpha=alpha)
