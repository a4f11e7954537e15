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

`push_weights(chunk_refs, receivers, version)` is the driver's side of the object-store transport: chunks (Ray
object refs, e.g. `LearnerGroup.weight_chunks`) reach the rollout workers with a bound on the chunks in flight.
The collective transport (rl/collective_sync.py, the default for the torch engine) broadcasts the same bucket plan
(`plan_pieces`) over a gloo/NCCL group instead; both walk `layered_weights` (one module gathered at a time).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from rollout.weight_format import Chunk, Entry, SyncStats, is_lora_part, lora_delta, nbytes, slice_name

__all__ = ["Chunk", "ChunkRef", "Entry", "SyncStats", "chunk_weights", "layered_weights", "lora_delta", "lora_modules",
           "lora_weights", "merged_weights", "nbytes", "plain_name", "plan_pieces", "push_weights", "stream_weights",
           "SYNC_MAX_INFLIGHT"]

SYNC_MAX_INFLIGHT = 2  # chunks a receiver may have outstanding: bounds the object store, keeps the pipe full


# ------------------------------------------------------------------------------------------------------- sender
def _cpu_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _wire_itemsize(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.dtype | None, int]:
    cast = None if name.endswith(".lora_scaling") else dtype  # the scale keeps float64 (exact merge)
    wire = cast if (cast is not None and tensor.is_floating_point()) else tensor.dtype
    return cast, torch.empty((), dtype=wire).element_size()


def _padded(n: int, align: int) -> int:
    return -(-n // align) * align


def plan_pieces(named: Iterable[Entry], bucket_bytes: int, *, dtype: torch.dtype | None = None,
                split_large: bool = True, align: int = 1) -> Iterator[tuple[str, torch.Tensor, torch.dtype | None]
                                                                   | None]:
    """The bucket plan, streamed: `(wire name, source view, cast dtype)` per piece, `None` where a bucket ends.

    Each piece counts its bytes rounded up to `align` (the collective path packs pieces at aligned offsets of one
    flat buffer), and a bucket's pieces add up to at most `bucket_bytes`. A tensor that does not fit an empty
    bucket is cut into row slices `name@start:stop` (split_large=True) or goes alone in an oversized bucket
    (split_large=False, for receivers that take whole tensors only). LoRA parts always travel whole. A piece is
    yielded while `named` has not advanced past its tensor (a ZeRO-3 gather is still open): copy it at once."""
    if bucket_bytes < 1 or align < 1:
        raise ValueError(f"weight sync: bucket_bytes and align must be >= 1, got {bucket_bytes}, {align}")
    size, open_bucket = 0, False
    for name, tensor in named:
        if "@" in name:
            raise ValueError(f"weight sync: parameter name {name!r} contains '@' (reserved for row slices)")
        cast, itemsize = _wire_itemsize(name, tensor, dtype)
        total = _padded(tensor.numel() * itemsize, align)
        whole = not split_large or is_lora_part(name)
        if size + total <= bucket_bytes or (whole and total > bucket_bytes and not open_bucket):
            yield name, tensor, cast
            size, open_bucket = size + total, True
            continue
        if total <= bucket_bytes or whole:
            yield None
            yield name, tensor, cast
            size, open_bucket = total, True
            continue
        # Larger than a bucket: row slices along dim 0, the first one filling what is left of this bucket.
        if tensor.dim() == 0:
            raise ValueError(f"weight sync: bucket_bytes {bucket_bytes} is smaller than scalar {name!r}")
        rows = tensor.shape[0]
        row_bytes = tensor.numel() * itemsize // rows
        if _padded(row_bytes, align) > bucket_bytes:
            raise ValueError(f"weight sync: bucket_bytes {bucket_bytes} is smaller than one row of {name!r} "
                             f"({row_bytes} bytes)")
        start = 0
        while start < rows:
            take = min((bucket_bytes - size) // row_bytes, rows - start)
            while take > 0 and size + _padded(take * row_bytes, align) > bucket_bytes:
                take -= 1
            if take == 0:
                yield None
                size, open_bucket = 0, False
                continue
            yield slice_name(name, start, start + take), tensor[start:start + take], cast
            size, open_bucket = size + _padded(take * row_bytes, align), True
            start += take
    if open_bucket:
        yield None


def chunk_weights(named: Iterable[Entry], bucket_bytes: int, *, dtype: torch.dtype | None = None,
                  split_large: bool = True) -> Iterator[list[Entry]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (CPU copies, cast to `dtype` if given), cut
    as `plan_pieces` plans them (the object-store path)."""
    bucket: list[Entry] = []
    for piece in plan_pieces(named, bucket_bytes, dtype=dtype, split_large=split_large):
        if piece is None:
            if bucket:
                yield bucket
            bucket = []
        else:
            name, view, cast = piece
            bucket.append((name, _cpu_copy(view, cast)))


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


def _gather_units(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, bool]]:
    """(path, module, is LoRA layer) in named_modules order: a LoRA-wrapped linear is one unit with everything
    under it (its base weight and adapters merge together), any other module a unit of its own parameters."""
    lora = {path for path, _ in lora_modules(model)}
    inside: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if inside and path.startswith(inside):
            continue
        if path in lora:
            inside = inside + (path + ".",)
        yield path, module, path in lora


def layered_weights(model: torch.nn.Module, gathered, *, lora: bool, emit: bool = True) -> Iterator[Entry]:
    """`merged_weights` (lora False) or the LoRA triples and trainable non-LoRA tensors (lora True), one module at a
    time inside `gathered(params)` (a ZeRO-3 gather: only one module's parameters are whole at once). With
    emit=False nothing is yielded, the gathers are only taken part in (ZeRO-3 ranks other than the sender)."""
    seen: set[int] = set()
    for path, module, is_lora in _gather_units(model):
        params = [(n, p) for n, p in module.named_parameters(recurse=is_lora) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for _, p in params)
        with gathered([p for _, p in params]):
            if not emit:
                continue
            prefix = f"{path}." if path else ""
            if is_lora and lora:
                adapter = _adapter(module)
                yield f"{path}.lora_A", module.lora_A[adapter].weight.detach()
                yield f"{path}.lora_B", module.lora_B[adapter].weight.detach()
                yield f"{path}.lora_scaling", torch.tensor(float(module.scaling[adapter]), dtype=torch.float64)
                continue
            for name, param in params:
                if "lora_" in name or (lora and not param.requires_grad):
                    continue
                if is_lora and name == "base_layer.weight":
                    adapter = _adapter(module)
                    delta = lora_delta(module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                                       float(module.scaling[adapter]))
                    yield plain_name(prefix + name), (param.detach() + delta.to(param.dtype)).detach()
                else:
                    yield plain_name(prefix + name), param.detach()


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
