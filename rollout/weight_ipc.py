"""Colocated weight sync through CUDA IPC handles (learner and rollout worker on the same GPU): no copy over a
wire, the receiver maps the sender's bucket buffer and copies from it into its parameters.

    sender (learner rank 0):  for item in ipc_buckets(pieces, version, bucket_bytes, device): hand `item` over
    receiver (rollout):       entries = open_bucket(item); apply(entries); release_bucket()

An item is a small picklable dict (the bucket header of rollout/weight_collective.py plus the buffer's IPC handle
from torch.multiprocessing.reductions.reduce_tensor); it travels through Ray (launch/driver_roles.py,
rollout.weight_sync "ipc"). The sender reuses ONE bucket buffer, so the driver must hand over item k and wait for
every receiver to have applied it before asking for item k + 1 (that ordering is what makes the reuse safe).
CUDA only: there is no host-memory IPC handle here, and this path has not run on this project's CPU machines.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from rollout.weight_collective import bucket_entries, pack_into, wire_tensor
from rollout.weight_format import Entry

__all__ = ["ipc_buckets", "open_bucket", "release_bucket"]


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"rollout.weight_sync 'ipc' needs CUDA tensors (learner and rollout on one GPU), got "
                         f"{device.type}")


def ipc_buckets(pieces: Iterable, version: int, bucket_bytes: int, device: torch.device | str) -> Iterator[dict]:
    """Pack a bucket plan (rl.weight_sync.plan_pieces, align=ALIGN) into one reused CUDA buffer; one item per
    bucket. The buffer's contents are valid for an item until the next one is requested."""
    from torch.multiprocessing.reductions import reduce_tensor

    device = torch.device(device)
    _require_cuda(device)
    flat = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
    meta, used = [], 0
    for piece in pieces:
        if piece is None:
            if meta:
                torch.cuda.current_stream(device).synchronize()  # the receiver reads on its own stream
                yield {"version": int(version), "entries": meta, "handle": reduce_tensor(flat[:used])}
            meta, used = [], 0
            continue
        name, tensor, cast = piece
        src = wire_tensor(tensor, cast)
        if not meta and src.numel() * src.element_size() > flat.numel():  # an oversized whole piece
            flat = torch.empty(src.numel() * src.element_size(), dtype=torch.uint8, device=device)
        entry, used = pack_into(flat, used, name, src)
        meta.append(entry)


_OPEN: list[torch.Tensor] = []  # the mapped bucket of the update in progress (one at a time)


def open_bucket(item: dict) -> tuple[int, list[Entry]]:
    """(version, typed views of the sender's bucket) in this process; call release_bucket() once applied."""
    rebuild, args = item["handle"]
    flat = rebuild(*args)
    _require_cuda(flat.device)
    _OPEN.append(flat)
    return int(item["version"]), bucket_entries(item, flat)


def release_bucket() -> None:
    """Drop the mapping of the last opened bucket (the sender may then reuse or free its buffer)."""
    _OPEN.clear()
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
