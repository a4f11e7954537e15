"""The rollout side of weight sync: apply a stream of chunks (rollout/weight_format.py) to a plain causal LM.

    receiver = WeightReceiver(policy.causal_lm)
    for version, entries in chunks: receiver.apply(entries, version)
    stats = receiver.finish(version)          # checks the update was complete, sets receiver.version

Chunks are applied in place as they arrive (no second copy of the model). Row slices are written into their rows
and the tensor counts as received once every row arrived exactly once. LoRA triples are merged onto a pristine copy
W0 of each targeted weight, taken before its first merge, so repeated syncs never accumulate rounding: the result
is bit for bit the learner's merge of the same adapters on the same base. That copy lives in host memory (pinned
when CUDA is present), so on an accelerator it costs no device memory: each merge brings one weight's base over,
adds the delta on the device and writes the parameter. The rollout model must start from the learner's frozen
base (the run's initial policy).

Strict checks, each a one-line ValueError naming the tensor: unknown name, wrong shape, a row range outside the
tensor or overlapping rows already received, a slice of a LoRA part, an entry arriving twice, chunks of another
version inside one update, and at `finish`: an incomplete LoRA triple, a sliced tensor with rows missing, a full
update (one without LoRA entries) that misses a parameter, a LoRA update that misses a weight earlier LoRA updates
carried. After an error the update is abandoned: `version` does not advance and the next update starts afresh
(the model may hold part of the failed one until a complete update arrives).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from rollout.weight_format import (
    Entry,
    SyncStats,
    is_lora_part,
    lora_delta,
    nbytes,
    parse_slice,
)

__all__ = ["WeightReceiver"]


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory (pinned when CUDA is present, so bringing it back is a fast DMA)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(t.detach())
    return out


class WeightReceiver:
    """Applies weight chunks to `model` in place; see the module doc."""

    def __init__(self, model: torch.nn.Module, *, strict: bool = True) -> None:
        self.model = model
        self.strict = strict
        self.version: int | None = None
        self._base: dict[str, torch.Tensor] = {}  # pristine W0 (host memory) of every LoRA-merged weight
        self._lora_layout: frozenset[str] | None = None  # weights the first complete LoRA update wrote
        self._reset()

    def discard(self) -> None:
        """Forget the update in progress (chunks applied, rows and LoRA parts pending); the version stays."""
        self._reset()

    def _reset(self) -> None:
        self._targets: dict[str, torch.Tensor] | None = None  # resolved per update: the model may move devices
        self._pending_version: int | None = None
        self._received: set[str] = set()  # tensors written whole this update (full, every row, or a LoRA merge)
        self._rows: dict[str, list[tuple[int, int]]] = {}
        self._lora: dict[str, dict[str, torch.Tensor]] = {}
        self._any_lora = False
        self.stats = SyncStats()

    # ---------------------------------------------------------------------------------------------- apply
    @torch.no_grad()
    def apply(self, entries: Iterable[Entry], version: int) -> int:
        """Apply one chunk; returns its bytes. Chunks of one update must carry the same version."""
        start = time.perf_counter()
        size = count = 0
        try:
            self._begin(version)
            for name, tensor in entries:
                self._apply_entry(name, tensor)
                size += nbytes(tensor)
                count += 1
        except ValueError:
            self._reset()
            raise
        self.stats.bytes += size
        self.stats.tensors += count
        self.stats.chunks += int(count > 0)
        self.stats.seconds += time.perf_counter() - start
        return size

    def _begin(self, version: int) -> None:
        if self._pending_version is None:
            self._pending_version = int(version)
            self._targets = dict(self.model.state_dict(keep_vars=True))
        elif int(version) != self._pending_version:
            raise ValueError(f"weight sync: chunk of version {version} inside the update to {self._pending_version}")

    def _target(self, name: str) -> torch.Tensor:
        if name not in self._targets:
            raise ValueError(f"weight sync: unknown parameter {name!r} (not in the receiving model)")
        return self._targets[name]

    def _whole(self, name: str) -> None:
        if name in self._received or name in self._rows:
            raise ValueError(f"weight sync: {name!r} arrived twice in one update")
        self._received.add(name)

    def _apply_entry(self, name: str, tensor: torch.Tensor) -> None:
        if is_lora_part(name):
            self._lora_part(name, tensor)
            return
        piece = parse_slice(name)
        if piece is not None:
            self._apply_rows(*piece, tensor)
            return
        target = self._target(name)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"weight sync: {name!r} has shape {tuple(tensor.shape)}, "
                             f"the receiving model expects {tuple(target.shape)}")
        self._whole(name)
        target.copy_(tensor)
        if name in self._base:  # a full tensor is the new base of later LoRA deltas
            self._base[name] = _host_copy(target)

    def _apply_rows(self, name: str, start: int, stop: int, tensor: torch.Tensor) -> None:
        if is_lora_part(name):
            raise ValueError(f"weight sync: {name!r} arrived as rows {start}:{stop}; LoRA parts travel whole")
        target = self._target(name)
        if target.dim() == 0 or not 0 <= start < stop <= target.shape[0]:
            raise ValueError(f"weight sync: rows {start}:{stop} outside {name!r} of shape {tuple(target.shape)}")
        expect = (stop - start,) + tuple(target.shape[1:])
        if tuple(tensor.shape) != expect:
            raise ValueError(f"weight sync: slice {name}@{start}:{stop} has shape {tuple(tensor.shape)}, "
                             f"expected {expect}")
        spans = self._rows.setdefault(name, [])
        if name in self._received or any(start < b and a < stop for a, b in spans):
            raise ValueError(f"weight sync: rows {start}:{stop} of {name!r} arrived twice in one update")
        target[start:stop].copy_(tensor)
        spans.append((start, stop))
        if sum(b - a for a, b in spans) == target.shape[0]:
            self._received.add(name)

    def _lora_part(self, name: str, tensor: torch.Tensor) -> None:
        module, part = name.rsplit(".", 1)
        self._any_lora = True
        pending = self._lora.setdefault(module, {})
        if part in pending:
            raise ValueError(f"weight sync: {name!r} arrived twice in one update")
        # A part may wait here for the rest of its triple past the end of its bucket, whose buffer the sender may
        # refill meanwhile (CUDA IPC reuses one buffer): keep a copy, not a view (adapters are small).
        pending[part] = tensor.clone()
        if len(pending) == 3:
            self._merge(module, pending)
            del self._lora[module]

    def _merge(self, module: str, parts: dict[str, torch.Tensor]) -> None:
        weight_name = f"{module}.weight"
        target = self._target(weight_name)
        a, b, scaling = parts["lora_A"], parts["lora_B"], parts["lora_scaling"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(
                target.shape):
            raise ValueError(f"weight sync: LoRA {module!r} A {tuple(a.shape)} / B {tuple(b.shape)} do not make "
                             f"a delta of {weight_name!r} {tuple(target.shape)}")
        if scaling.numel() != 1:
            raise ValueError(f"weight sync: {module + '.lora_scaling'!r} has shape {tuple(scaling.shape)}, "
                             "expected a scalar")
        self._whole(weight_name)
        if weight_name not in self._base:
            self._base[weight_name] = _host_copy(target)
        base = self._base[weight_name].to(target.device, non_blocking=True)
        delta = lora_delta(b.to(target.device), a.to(target.device), float(scaling))
        target.copy_(base + delta.to(base.dtype))

    # --------------------------------------------------------------------------------------------- finish
    def finish(self, version: int, *, strict: bool | None = None) -> SyncStats:
        """End of one update (see the module doc for its checks). Sets `version`; returns the update's stats.
        strict (default: the receiver's) False skips the completeness checks of whole parameters."""
        strict = self.strict if strict is None else strict
        try:
            if self._pending_version is not None and int(version) != self._pending_version:
                raise ValueError(f"weight sync: finish({version}) after chunks of version {self._pending_version}")
            if self._lora:
                module, parts = next(iter(self._lora.items()))
                raise ValueError(f"weight sync: LoRA {module!r} incomplete (got {sorted(parts)})")
            self._check_rows()
            if strict:
                self._check_complete()
            if self._any_lora and self._lora_layout is None:
                self._lora_layout = frozenset(self._received)
            self.version = int(version)
            return self.stats
        finally:
            self._reset()

    def _check_rows(self) -> None:
        for name, spans in self._rows.items():
            if name in self._received:
                continue
            rows, at = self._targets[name].shape[0], 0
            for a, b in sorted(spans):
                if a > at:
                    break
                at = b
            got = sum(b - a for a, b in spans)
            gap_end = min([a for a, _ in spans if a > at], default=rows)
            raise ValueError(f"weight sync: {name!r} received only {got} of {rows} rows (rows {at}:{gap_end} "
                             f"missing); version stays {self.version}")

    def _check_complete(self) -> None:
        if self._any_lora:
            missing = sorted((self._lora_layout or frozenset()) - self._received)
            if missing:
                raise ValueError(f"weight sync: LoRA update without {missing[0]!r}, which earlier LoRA updates "
                                 f"carried ({len(missing)} missing); version stays {self.version}")
            return
        params = {name for name, _ in self.model.named_parameters()}
        missing = sorted(params - self._received)
        if missing:
            raise ValueError(f"weight sync: {len(missing)} parameters never arrived (first: {missing[0]!r}); "
                             f"version stays {self.version}")
