"""Learner -> rollout weight streaming in fixed-size buckets, and the receiving side.

Sender: `stream_weights(named, version, bucket_bytes)` turns (name, tensor) pairs into a generator of
`(version, [(name, tensor), ...])` chunks of at most `bucket_bytes` each (CPU copies made one chunk at a time, so
the sender never holds more than one chunk beyond the model). One call per chunk crosses an actor boundary (a Ray
object per chunk), never one per parameter, never through disk.

Entry names are the plain causal-LM parameter names (`model.layers.0.mlp.up_proj.weight`, PEFT's `.base_layer`
removed), the names `TorchEngine.update_weights` checks against. Three entry kinds:
- full tensor             `name`                          -> copied over the parameter
- row slice of a tensor   `name@start:stop`               -> rows start..stop of dim 0 (a tensor larger than a
                                                              bucket is split so no chunk exceeds the limit)
- LoRA delta of a linear  `module.lora_A` (r, in), `module.lora_B` (out, r), `module.lora_scaling` (0-d float64)
                                                           -> weight = W0 + (lora_B @ lora_A) * scaling
With LoRA only the adapter tensors travel (r * (in + out) per projection instead of in * out). The receiver keeps
a pristine copy W0 of every weight it has merged a delta into (taken before the first merge), so repeated syncs
never accumulate rounding: the result is bit-for-bit PEFT's `merge_adapter` of the same adapters on the same base.
That copy costs the memory of the targeted weights on the rollout side; an engine with native adapter support
(SGLang, vLLM) would load the adapters instead.

Receiver: `WeightReceiver(model)` applies chunks in place, bucket by bucket, with strict checks (unknown name,
shape, row range, incomplete LoRA triple, a full update that misses a parameter) and counts bytes and seconds.
It depends on torch only, so a rollout engine can use it as is.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

Entry = tuple[str, torch.Tensor]
Chunk = tuple[int, list[Entry]]

_PIECE = re.compile(r"^(?P<name>.+)@(?P<start>\d+):(?P<stop>\d+)$")
LORA_SUFFIXES = (".lora_A", ".lora_B", ".lora_scaling")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class SyncStats:
    bytes: int = 0
    chunks: int = 0
    tensors: int = 0
    seconds: float = 0.0

    def metrics(self, prefix: str = "weight_sync") -> dict[str, float]:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        return {f"{prefix}_bytes": float(self.bytes), f"{prefix}_chunks": float(self.chunks),
                f"{prefix}_seconds": self.seconds, f"{prefix}_bytes_per_s": rate}


# ------------------------------------------------------------------------------------------------------- sender
def _cpu_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def chunk_weights(named: Iterable[Entry], bucket_bytes: int, *, dtype: torch.dtype | None = None,
                  split_large: bool = True) -> Iterator[list[Entry]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (CPU copies, cast to `dtype` if given).

    A tensor that does not fit an empty bucket is cut into row slices `name@start:stop` (split_large=True) or sent
    alone in an oversized chunk (split_large=False, for receivers that take whole tensors only)."""
    if bucket_bytes < 1:
        raise ValueError(f"weight sync: bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[Entry] = []
    size = 0
    for name, tensor in named:
        if "@" in name:
            raise ValueError(f"weight sync: parameter name {name!r} contains '@' (reserved for row slices)")
        itemsize = torch.empty((), dtype=dtype if (dtype is not None and tensor.is_floating_point())
                               else tensor.dtype).element_size()
        total = tensor.numel() * itemsize
        if size + total <= bucket_bytes or (not split_large and total > bucket_bytes and not bucket):
            bucket.append((name, _cpu_copy(tensor, dtype)))
            size += total
            continue
        if total <= bucket_bytes or not split_large:
            yield bucket
            bucket, size = [(name, _cpu_copy(tensor, dtype))], total
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
            piece = _cpu_copy(tensor[start:start + take], dtype)
            bucket.append((f"{name}@{start}:{start + take}", piece))
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


def lora_delta(lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's delta weight of a Linear: (B @ A) * scaling."""
    return (lora_b @ lora_a) * scaling


# ----------------------------------------------------------------------------------------------------- receiver
@dataclass
class _Pending:
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class WeightReceiver:
    """Applies weight chunks to a plain causal LM in place; `finish(version)` checks the update was complete.

    receiver = WeightReceiver(policy.causal_lm)
    for version, entries in chunks: receiver.apply(entries, version)
    stats = receiver.finish(version)
    """

    def __init__(self, model: torch.nn.Module, *, strict: bool = True) -> None:
        self.model = model
        self.strict = strict
        self.version: int | None = None
        self._targets = dict(model.state_dict(keep_vars=True))
        self._params = {name for name, _ in model.named_parameters()}
        self._base: dict[str, torch.Tensor] = {}  # pristine W0 of every weight a LoRA delta was merged into
        self._reset()

    def _reset(self) -> None:
        self._received: set[str] = set()
        self._rows: dict[str, int] = {}
        self._lora: dict[str, _Pending] = {}
        self._any_lora = False
        self._pending_version: int | None = None
        self.stats = SyncStats()

    def _target(self, name: str) -> torch.Tensor:
        if name not in self._targets:
            raise ValueError(f"weight sync: unknown parameter {name!r} (not in the receiving model)")
        return self._targets[name]

    @torch.no_grad()
    def apply(self, entries: Iterable[Entry], version: int) -> int:
        """Apply one chunk; returns its bytes. Chunks of one update must carry the same version."""
        if self._pending_version is None:
            self._pending_version = int(version)
        elif int(version) != self._pending_version:
            raise ValueError(f"weight sync: chunk of version {version} inside the update to {self._pending_version}")
        start = time.perf_counter()
        size = 0
        for name, tensor in entries:
            size += nbytes(tensor)
            self.stats.tensors += 1
            if name.endswith(LORA_SUFFIXES):
                self._lora_part(name, tensor)
                continue
            piece = _PIECE.match(name)
            if piece:
                self._apply_rows(piece["name"], int(piece["start"]), int(piece["stop"]), tensor)
                continue
            target = self._target(name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"weight sync: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the receiving model expects {tuple(target.shape)}")
            target.copy_(tensor)
            if name in self._base:  # a full tensor is the new base of later LoRA deltas
                self._base[name] = target.detach().clone()
            self._received.add(name)
        self.stats.bytes += size
        self.stats.chunks += 1
        self.stats.seconds += time.perf_counter() - start
        return size

    def _apply_rows(self, name: str, start: int, stop: int, tensor: torch.Tensor) -> None:
        target = self._target(name)
        if target.dim() == 0 or not 0 <= start < stop <= target.shape[0]:
            raise ValueError(f"weight sync: rows {start}:{stop} outside {name!r} of shape {tuple(target.shape)}")
        expect = (stop - start,) + tuple(target.shape[1:])
        if tuple(tensor.shape) != expect:
            raise ValueError(f"weight sync: slice {name}@{start}:{stop} has shape {tuple(tensor.shape)}, "
                             f"expected {expect}")
        target[start:stop].copy_(tensor)
        self._rows[name] = self._rows.get(name, 0) + (stop - start)
        if self._rows[name] >= target.shape[0]:
            self._received.add(name)

    def _lora_part(self, name: str, tensor: torch.Tensor) -> None:
        module, kind = name.rsplit(".", 1)
        self._any_lora = True
        pending = self._lora.setdefault(module, _Pending())
        if kind in pending.parts:
            raise ValueError(f"weight sync: {name!r} arrived twice in one update")
        pending.parts[kind] = tensor
        if len(pending.parts) < 3:
            return
        weight_name = f"{module}.weight"
        target = self._target(weight_name)
        a, b, scaling = pending.parts["lora_A"], pending.parts["lora_B"], pending.parts["lora_scaling"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(
                target.shape):
            raise ValueError(f"weight sync: LoRA {module!r} A {tuple(a.shape)} / B {tuple(b.shape)} do not make "
                             f"a delta of {weight_name!r} {tuple(target.shape)}")
        if weight_name not in self._base:
            self._base[weight_name] = target.detach().clone()
        base = self._base[weight_name]
        delta = lora_delta(b.to(base.device), a.to(base.device), float(scaling))
        target.copy_(base + delta.to(base.dtype))
        del self._lora[module]

    def finish(self, version: int) -> SyncStats:
        """End of one update: every LoRA triple complete, every sliced tensor whole, and (for a full update, one
        without LoRA entries) every parameter received. Sets `version`; returns the update's stats."""
        try:
            if self._pending_version is not None and int(version) != self._pending_version:
                raise ValueError(f"weight sync: finish({version}) after chunks of version {self._pending_version}")
            if self._lora:
                module, pending = next(iter(self._lora.items()))
                raise ValueError(f"weight sync: LoRA {module!r} incomplete (got {sorted(pending.parts)})")
            partial = [n for n, rows in self._rows.items() if rows < self._targets[n].shape[0]]
            if partial:
                raise ValueError(f"weight sync: {partial[0]!r} received only {self._rows[partial[0]]} rows")
            missing = sorted(self._params - self._received)
            if self.strict and not self._any_lora and missing:
                raise ValueError(f"weight sync: {len(missing)} parameters never arrived (first: {missing[0]!r}); "
                                 f"version stays {self.version}")
            self.version = int(version)
            return self.stats
        finally:
            self._reset()
