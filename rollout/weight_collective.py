"""Weight sync over a torch.distributed group of its own: learner rank 0 broadcasts flat buckets to rollout workers.

The group is *stateless* with respect to torch.distributed's default world: the learner ranks already have one
(rl/learner_backend.py), the rollout workers none, and a default world cannot be joined from outside. So the
group is a ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA) built directly on a `TCPStore` that learner rank 0
serves (`SyncStore`), each group under its own key prefix (`GroupSpec.group_id`): forming a new group after a
rollout worker restarted is just a new id over the same store. Nothing here touches `dist.init_process_group`.

Wire, per bucket (rank 0 -> everyone, three broadcasts):
    sizes  int64[2]          (header bytes, flat bytes); (0, 0) ends the update
    header uint8[...]        JSON: the update's version and, per entry, (wire name, dtype, shape, byte offset)
    flat   uint8[...]        the entries' bytes, each at an offset aligned to ALIGN (so views of it are typed)
Entry names follow rollout/weight_format.py (full tensors, row slices, LoRA triples), so the receiving side hands
them to the same WeightReceiver checks as the object-store path. The sender keeps at most `max_inflight` buckets
allocated (a bucket's buffer is reused once its broadcast completed); a receiver holds one bucket at a time.
The bucket plan itself is made by the sender (rl.weight_sync.plan_pieces) and travels in the headers, so both
sides agree on it without a separate metadata exchange.
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from rollout.weight_format import Entry, SyncStats

__all__ = ["ALIGN", "BucketSender", "GroupMember", "GroupSpec", "SyncStore", "join_group", "new_group_id",
           "receive_buckets", "receive_update", "send_pieces"]

ALIGN = 64  # byte alignment of every entry in a flat bucket (any dtype's view of it is then legal)
DEFAULT_TIMEOUT_S = 120.0  # rendezvous and per-collective limit: a member that died makes the others fail after it
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


@dataclass(frozen=True)
class GroupSpec:
    """Where and how a sync group forms: learner rank 0 is rank 0, receivers 1..world_size-1."""
    host: str
    port: int
    world_size: int
    group_id: str
    backend: str = "gloo"  # "nccl" when every member has a CUDA device
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        if self.world_size < 2:
            raise ValueError(f"weight sync group: world_size must be >= 2 (a sender and a receiver), got "
                             f"{self.world_size}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync group: backend {self.backend!r} is not 'gloo' or 'nccl'")


def new_group_id() -> str:
    return uuid.uuid4().hex[:12]


def node_address() -> str:
    """This node's address as other nodes reach it (Ray's view when inside Ray, else loopback)."""
    import ray  # a dependency of diffrl: only whether this process is inside a Ray session varies

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return socket.gethostbyname("localhost")


class SyncStore:
    """The TCPStore every sync group meets at, served by learner rank 0 for its life (port chosen by the OS)."""

    def __init__(self, host: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        self.host = host or node_address()
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))
        self.port = int(self.store.port)


def join_group(spec: GroupSpec, rank: int, store=None):
    """This process's member of the group `spec` names (rank 0 passes its SyncStore's store)."""
    import torch.distributed as dist

    if not 0 <= rank < spec.world_size:
        raise ValueError(f"weight sync group: rank {rank} outside world_size {spec.world_size}")
    timeout = timedelta(seconds=spec.timeout_s)
    if store is None:
        store = dist.TCPStore(spec.host, spec.port, is_master=False, wait_for_workers=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"diffrl-wsync/{spec.group_id}", store)
    if spec.backend == "nccl":
        # The timeout, as for gloo: without it NCCL's default (10 min) is what a member waits on a peer that died.
        return dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, timeout)
    return dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)


# ------------------------------------------------------------------------------------------------------ sending
def wire_tensor(tensor: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    src = tensor.detach()
    return src.to(cast) if cast is not None and src.is_floating_point() else src


def pack_into(flat: torch.Tensor, used: int, name: str, src: torch.Tensor) -> tuple[list, int]:
    """Copy `src` into `flat` at the next ALIGN-ed offset after `used` bytes; -> (header entry, bytes used)."""
    nbytes = src.numel() * src.element_size()
    offset = -(-used // ALIGN) * ALIGN
    if offset + nbytes > flat.numel():
        raise ValueError(f"weight sync: piece {name!r} ({nbytes} bytes) overflows its bucket (plan and buffer "
                         "disagree)")
    flat[offset:offset + nbytes].view(src.dtype).view(src.shape).copy_(src)  # blocking: gloo reads from a thread
    return [name, str(src.dtype).removeprefix("torch."), list(src.shape), offset], offset + nbytes


class BucketSender:
    """Rank 0's side: `add(name, tensor, cast)` copies a piece into the current flat bucket at once (so a ZeRO-3
    gather may close right after), `flush()` broadcasts it, `close()` sends the end marker and waits. At most
    `max_inflight` bucket buffers exist; `stats` counts bytes, buckets, tensors and seconds."""

    def __init__(self, group, version: int, bucket_bytes: int, *, device: torch.device | str = "cpu",
                 max_inflight: int = 2, stats: SyncStats | None = None):
        if max_inflight < 1:
            raise ValueError(f"weight sync: max_inflight must be >= 1, got {max_inflight}")
        self.group, self.version, self.bucket_bytes = group, int(version), int(bucket_bytes)
        self.device, self.max_inflight = torch.device(device), max_inflight
        self.stats = stats if stats is not None else SyncStats()
        self._free: list[torch.Tensor] = []  # buffers whose broadcast completed
        self._inflight: deque = deque()  # (works, buffers) of buckets being broadcast, oldest first
        self._flat: torch.Tensor | None = None
        self._meta: list[list] = []
        self._used = 0
        self.peak_buffers = 0  # the most bucket buffers allocated at once (tests check the bound)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        while True:
            while self._free and self._free[-1].numel() < nbytes:
                self._free.pop()  # too small for an oversized piece: let it go
            if self._free:
                return self._free.pop()
            if len(self._inflight) < self.max_inflight:
                break
            self._retire()
        self.peak_buffers = max(self.peak_buffers, len(self._inflight) + 1)
        return torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8, device=self.device)

    def add(self, name: str, tensor: torch.Tensor, cast: torch.dtype | None = None) -> None:
        start = time.perf_counter()
        src = wire_tensor(tensor, cast)
        nbytes = src.numel() * src.element_size()
        if self._flat is None:
            self._flat = self._buffer(nbytes)
        entry, self._used = pack_into(self._flat, self._used, name, src)
        self._meta.append(entry)
        self.stats.bytes += nbytes
        self.stats.tensors += 1
        self.stats.seconds += time.perf_counter() - start

    def flush(self) -> None:
        if self._flat is None:
            return
        start = time.perf_counter()
        header = json.dumps({"version": self.version, "entries": self._meta}).encode()
        sizes = torch.tensor([len(header), self._used], dtype=torch.int64, device=self.device)
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        flat = self._flat
        works = [self.group.broadcast(t, 0) for t in (sizes, head, flat[:self._used])]
        self._inflight.append((works, flat))
        self._flat, self._meta, self._used = None, [], 0
        self.stats.chunks += 1
        self.stats.seconds += time.perf_counter() - start

    def _retire(self) -> None:
        works, flat = self._inflight.popleft()
        for work in works:
            work.wait()
        if flat.device.type == "cuda":
            # NCCL's wait only orders the current stream after the broadcast; wait on the host too, so at most
            # max_inflight broadcasts are ever enqueued: each one's NCCL timeout (counted from its enqueue) then
            # covers its own transfer, not every bucket queued before it.
            torch.cuda.current_stream(flat.device).synchronize()
        self._free.append(flat)

    def close(self) -> SyncStats:
        self.flush()
        start = time.perf_counter()
        end = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.group.broadcast(end, 0).wait()
        while self._inflight:
            self._retire()
        self._free.clear()
        self.stats.seconds += time.perf_counter() - start
        return self.stats


def send_pieces(group, pieces: Iterable, version: int, bucket_bytes: int, **options) -> BucketSender:
    """Broadcast a bucket plan (`(name, view, cast)` pieces, None at bucket ends; rl.weight_sync.plan_pieces)."""
    sender = BucketSender(group, version, bucket_bytes, **options)
    for piece in pieces:
        if piece is None:
            sender.flush()
        else:
            sender.add(*piece)
    sender.close()
    return sender


# ---------------------------------------------------------------------------------------------------- receiving
def bucket_entries(header: dict, flat: torch.Tensor) -> list[Entry]:
    """Typed views of a flat bucket's entries, as its header lists them (bounds and alignment checked)."""
    out = []
    for name, dtype_name, shape, offset in header["entries"]:
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"weight sync: {name!r} arrived as unsupported dtype {dtype_name!r}")
        count = 1
        for dim in shape:
            count *= int(dim)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset % ALIGN or offset < 0 or offset + nbytes > flat.numel():
            raise ValueError(f"weight sync: {name!r} lies outside its bucket (offset {offset}, {nbytes} bytes)")
        out.append((name, flat[offset:offset + nbytes].view(dtype).view(shape)))
    return out


def receive_buckets(group, device: torch.device | str = "cpu") -> Iterator[tuple[int, list[Entry]]]:
    """A receiver's side: `(version, entries)` per bucket until the end marker; the entries are views of one
    bucket buffer, valid until the next bucket is asked for (apply them first)."""
    device = torch.device(device)
    while True:
        sizes = torch.zeros(2, dtype=torch.int64, device=device)
        group.broadcast(sizes, 0).wait()
        header_len, flat_len = (int(v) for v in sizes.tolist())
        if header_len == 0:
            return
        head = torch.empty(header_len, dtype=torch.uint8, device=device)
        group.broadcast(head, 0).wait()
        flat = torch.empty(flat_len, dtype=torch.uint8, device=device)
        group.broadcast(flat, 0).wait()
        header = json.loads(head.cpu().numpy().tobytes())
        yield int(header["version"]), bucket_entries(header, flat)


class GroupMember:
    """One process's membership in the current sync group, re-formed whenever the driver names a new group id (a
    member restarted, or the last sync failed): the previous group is dropped first, so its sockets close."""

    def __init__(self, store=None):
        self.store = store  # rank 0: its SyncStore's TCPStore; receivers connect as clients
        self.spec: GroupSpec | None = None
        self.group = None

    def get(self, spec: GroupSpec, rank: int):
        if self.spec != spec or self.group is None:
            self.drop()
            self.group = join_group(spec, rank, store=self.store)
            self.spec = spec
        return self.group

    def drop(self) -> None:
        group, backend = self.group, (self.spec.backend if self.spec is not None else None)
        self.group, self.spec = None, None
        if group is not None and backend == "nccl" and hasattr(group, "abort"):
            group.abort()  # unblocks NCCL peers waiting on a collective; gloo closes its sockets when released


def receive_update(member: GroupMember, spec: GroupSpec, rank: int, apply: Callable[[list[Entry], int], object],
                   device: torch.device | str = "cpu") -> int:
    """Receive one whole update in group `spec` as `rank`, each bucket through `apply(entries, version)`; returns
    the bucket count. An `apply` error (a bad entry) is raised after the stream ended, so the group stays in step
    for the next update; a transport error drops the group (the driver forms a new one)."""
    group = member.get(spec, rank)
    count, error = 0, None
    try:
        for version, entries in receive_buckets(group, device):
            count += 1
            if error is None:
                try:
                    apply(entries, version)
                except ValueError as err:
                    error = err
    except BaseException:
        del group  # no reference left here: dropping the member closes the group
        member.drop()
        raise
    if error is not None:
        raise error
    return count
