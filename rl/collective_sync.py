"""Learner side of weight sync over a collective group (the transport: rollout/weight_collective.py).

Learner rank 0 serves the group's TCPStore and broadcasts the bucket plan of `Learner.named_weights`; under ZeRO-3
every rank walks the same module-by-module gathers, and only rank 0 copies anything (into its at most
`max_inflight` flat bucket buffers, on the device the group communicates from: CUDA for NCCL, host memory for
gloo). The driver (launch/driver_roles.RolloutPool) starts `LearnerWorker.send_weights` on every rank and
`RolloutWorker.receive_weights` on every receiver together.
"""
from __future__ import annotations

import torch

from rl.weight_sync import SYNC_MAX_INFLIGHT, SyncStats, plan_pieces
from rollout.weight_collective import ALIGN, GroupMember, GroupSpec, send_pieces

__all__ = ["finish_gathers", "send_over_group", "walk_gathers"]


def walk_gathers(learner, lora_delta: bool | None) -> None:
    """A rank other than 0: take part in the ZeRO-3 gathers of one sync, copy nothing."""
    for _ in learner.named_weights(lora_delta, emit=False):
        pass


def group_device(spec: GroupSpec, learner) -> torch.device:
    """Where the bucket buffers live: NCCL moves device tensors only (the learner's GPU), gloo host ones."""
    if spec.backend != "nccl":
        return torch.device("cpu")
    device = torch.device(learner.device)
    if device.type == "cpu":
        raise RuntimeError("weight sync: an NCCL group needs learner rank 0 on a GPU (it computes on cpu)")
    return device


def send_over_group(learner, member: GroupMember, spec: GroupSpec, version: int, bucket_bytes: int, *,
                    lora_delta: bool | None = None, dtype: torch.dtype | None = None, split_large: bool = True,
                    max_inflight: int = SYNC_MAX_INFLIGHT, stats: SyncStats | None = None) -> dict[str, float]:
    """Rank 0: broadcast `learner`'s weights as version `version` to group `spec`'s receivers; returns the
    sender's figures (bytes, buckets, seconds, peak bucket buffers)."""
    stats = stats if stats is not None else SyncStats()
    named = learner.named_weights(lora_delta)
    try:
        group = member.get(spec, 0)
        pieces = plan_pieces(named, bucket_bytes, dtype=dtype, split_large=split_large, align=ALIGN)
        sender = send_pieces(group, pieces, version, bucket_bytes, device=group_device(spec, learner),
                             max_inflight=max_inflight, stats=stats)
    except BaseException:
        group = None
        member.drop()  # the receivers see the group close and fail too; the driver forms a new one
        finish_gathers(named)
        raise
    return {**stats.metrics(), "weight_sync_peak_buffers": float(sender.peak_buffers)}


def finish_gathers(named) -> None:
    """After a failed send: walk what is left of rank 0's `named_weights`, copying nothing. Under ZeRO-3 the other
    ranks are inside the same module-by-module gathers (walk_gathers) and would otherwise wait in the next one
    for rank 0 until the learner group's timeout (NCCL's watchdog then ends the process). A generator that failed
    itself (a gather's own error) is already finished: nothing is walked."""
    for _ in named:
        pass
