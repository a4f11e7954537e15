"""Learner -> rollout weight streaming in fixed-size buckets (the sending side).

`stream_weights(named, version, bucket_bytes)` turns (name, tensor) pairs into a generator of
`(version, [(name, tensor), ...])` chunks of at most `bucket_bytes` each (CPU copies made one chunk at a time, so
the sender never holds more than one chunk beyond the model). One call per chunk crosses an actor boundary (a Ray
object per chunk), never one per parameter, never through disk.

The wire format (full tensors, row slices `name@start:stop`, LoRA triples `module.lora_A/lora_B/lora_scaling`) is
defined once in rollout/weight_format.py; the receiver, `rollout.weight_receiver.WeightReceiver`, is what
`TorchEngine.update_weights` applies chunks with. With LoRA only the adapter tensors travel (r * (in + out) per
projection instead of in * out) and the receiver merges them onto its copy of the frozen base, bit for bit
`merged_weights` below; an engine with native adapter support (SGLang, vLLM) would load the adapters instead.

`push_weights(chunk_refs, receivers, version)` is the driver's side: the one way chunks (Ray object refs, e.g.
`LearnerGroup.weight_chunks`) reach the rollout workers, with a bound on the chunks in flight.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from rollout.weight_format import Chunk, Entry, SyncStats, is_lora_part, lora_delta, nbytes, slice_name

__all__ = ["Chunk", "ChunkRef", "Entry", "SyncStats", "chunk_weights", "lora_delta", "lora_modules", "lora_weights",
           "merged_weights", "nbytes", "plain_name", "push_weights", "stream_weights", "SYNC_MAX_INFLIGHT"]

SYNC_MAX_INFLIGHT = 2  # chunks a receiver may have outstanding: bounds the object store, keeps the pipe full


# ------------------------------------------------------------------------------------------------------- sender
def _cpu_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def chunk_weights(named: Iterable[Entry], bucket_bytes: int, *, dtype: torch.dtype | None = None,
                  split_large: bool = True) -> Iterator[list[Entry]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (CPU copies, cast to `dtype` if given).

    A tensor that does not fit an empty bucket is cut into row slices `name@start:stop` (split_large=True) or sent
    alone in an oversized chunk (split_large=False, for receivers that take whole tensors only). LoRA parts always
    travel whole (the wire format never slices them)."""
    if bucket_bytes < 1:
        raise ValueError(f"weight sync: bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[Entry] = []
    size = 0
    for name, tensor in named:
        if "@" in name:
            raise ValueError(f"weight sync: parameter name {name!r} contains '@' (reserved for row slices)")
        cast = None if name.endswith(".lora_scaling") else dtype  # the scale keeps float64 (exact merge)
        itemsize = torch.empty((), dtype=cast if (cast is not None and tensor.is_floating_point())
                               else tensor.dtype).element_size()
        total = tensor.numel() * itemsize
        whole = not split_large or is_lora_part(name)
        if size + total <= bucket_bytes or (whole and total > bucket_bytes and not bucket):
            bucket.append((name, _cpu_copy(tensor, cast)))
            size += total
            continue
        if total <= bucket_bytes or whole:
            yield bucket
            bucket, size = [(name, _cpu_copy(tensor, cast))], total
            continue
        # Larger than a bucket: row slices along dim 0, the first one filling what is left of this bucket.
        if tensor.dim() == 0:
            raise ValueError(f"weight sync: bucket_bytes {bucket_bytes} is smaller than scalar {name!r}")
        row_bytes = total // tensor.shape[0]
        if row_bytes > bucket_bytes:
            raise ValueError(f"weight sync: bucket_bytes {bucket_bytes} is smaller than one row of {name!r} "
                             f"({row_bytes} bytes)")
        start, rows = 0, tensor.shape[0]
        while start < rows:
            take = min((bucket_bytes - size) // row_bytes, rows - start)
            if take == 0:
                yield bucket
                bucket, size = [], 0
                continue
            piece = _cpu_copy(tensor[start:start + take], cast)
            bucket.append((slice_name(name, start, start + take), piece))
            size += take * row_bytes
            start += take
    if bucket:
        yield bucket


def stream_weights(named: Iterable[Entry], version: int, bucket_bytes: int, *, dtype: torch.dtype | None = None,
                   split_large: bool = True, stats: SyncStats | None = None) -> Iterator[Chunk]:
    """`(version, entries)` chunks of at most `bucket_bytes`; `stats` (if given) counts bytes, chunks, seconds."""
    stats = stats if stats is not None else SyncStats()
    start = time.perf_counter()
    for entries in chunk_weights(named, bucket_bytes, dtype=dtype, split_large=split_large):
        stats.bytes += sum(nbytes(t) for _, t in entries)
        stats.chunks += 1
        stats.tensors += len(entries)
        stats.seconds += time.perf_counter() - start
        yield int(version), entries
        start = time.perf_counter()
    stats.seconds += time.perf_counter() - start


# ------------------------------------------------------------------------------------- driver: chunks -> workers
class ChunkRef:
    """A chunk's ObjectRef inside a wrapper so Ray does not resolve it on the way in: the receiver resolves it
    itself (ray.get), so one object is shared by every receiver instead of being copied into each call. Iterating
    it gives the chunk's (name, tensor) entries."""

    def __init__(self, ref):
        self.ref = ref

    def __iter__(self):
        import ray

        _, entries = ray.get(self.ref)
        return iter(entries)


def push_weights(chunk_refs: Iterable, receivers: list, version: int, *,
                 max_inflight: int = SYNC_MAX_INFLIGHT) -> int:
    """Stream chunk ObjectRefs to every receiver actor, then complete the update on each; returns the chunk count.

    Receiver contract (rollout.worker.RolloutWorker): `update_weights(entries, version, final=False)` per chunk,
    then `update_weights({}, version, final=True)`, which checks every parameter arrived and returns the version
    the receiver now holds. At most `max_inflight` chunks are outstanding per receiver (1: each chunk applied
    before the next is sent), so the object store holds a bounded number of chunks however large the model."""
    import ray

    if max_inflight < 1:
        raise ValueError(f"push_weights: max_inflight must be >= 1, got {max_inflight}")
    pending: deque[list] = deque()  # per chunk sent: every receiver's call, oldest first
    chunks = 0
    for ref in chunk_refs:
        while len(pending) >= max_inflight:
            ray.get(pending.popleft())
        pending.append([r.update_weights.remote(ChunkRef(ref), version, final=False) for r in receivers])
        chunks += 1
    while pending:
        ray.get(pending.popleft())
    held = ray.get([r.update_weights.remote({}, version, final=True) for r in receivers])
    wrong = [v for v in held if v != version]
    if wrong:
        raise RuntimeError(f"weight sync: a rollout worker reports version {wrong[0]} after syncing {version}")
    return chunks


# ----------------------------------------------------------------------------------------- learner-side names
def plain_name(name: str) -> str:
    """A PEFT-wrapped causal LM's parameter name as the plain model names it."""
    return name.replace(".base_layer.", ".")


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(plain module path, PEFT LoRA layer) of every LoRA-wrapped linear under `model` (the causal LM)."""
    out = []
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(getattr(module, "lora_A", {})):
            out.append((path, module))
    return out


def _adapter(module) -> str:
    names = list(module.active_adapters) if hasattr(module, "active_adapters") else ["default"]
    if len(names) != 1:
        raise ValueError(f"weight sync: exactly one active LoRA adapter is supported, got {names}")
    name = names[0]
    if getattr(module, "fan_in_fan_out", False) or getattr(module, "use_dora", {}).get(name, False):
        raise ValueError("weight sync: fan_in_fan_out / DoRA adapters are not supported")
    return name


def merged_weights(model: torch.nn.Module) -> Iterator[Entry]:
    """Full plain-named weights of a (possibly PEFT-wrapped) causal LM, LoRA deltas merged in, without touching it:
    W0 + (B @ A) * scaling exactly as PEFT's merge computes it."""
    deltas = {}
    for path, module in lora_modules(model):
        adapter = _adapter(module)
        deltas[f"{path}.base_layer.weight"] = (module, adapter)
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        if name in deltas:
            module, adapter = deltas[name]
            delta = lora_delta(module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                               float(module.scaling[adapter]))
            yield plain_name(name), (param.detach() + delta.to(param.dtype)).detach()
        else:
            yield plain_name(name), param.detach()


def lora_weights(model: torch.nn.Module) -> Iterator[Entry]:
    """LoRA triples of every adapted linear, plus any trainable non-LoRA parameter as a full tensor."""
    for path, module in lora_modules(model):
        adapter = _adapter(module)
        yield f"{path}.lora_A", module.lora_A[adapter].weight.detach()
        yield f"{path}.lora_B", module.lora_B[adapter].weight.detach()
        yield f"{path}.lora_scaling", torch.tensor(float(module.scaling[adapter]), dtype=torch.float64)
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            yield plain_name(name), param.detach()
