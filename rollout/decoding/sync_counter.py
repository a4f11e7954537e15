"""A test hook that counts host syncs (device -> host reads) and host -> device copies made while decoding.

On a GPU every read of a device value by Python (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, `t.nonzero()`,
boolean-mask indexing, `.cpu()`, ...) waits for the device to drain, and every `torch.tensor(list, device=...)` is
a blocking copy. On the CPU both are free, but the decoders run the same code on either device, so counting the
calls that *would* sync (a TorchFunctionMode sees them whatever the device) gives the GPU's count on the CPU.

Usage (tests, benchmarks/gpu_smoke.py):

    with count_host_syncs() as counts:
        engine.generate(requests)
    counts.syncs, counts.steps, counts.syncs_per_step, counts.h2d_copies, counts.ops

One call is device-dependent: `.to("cpu")` counts only where the tensor lives elsewhere (on a CPU run the decoding
device *is* the host, and `.to(decoding device)` is a no-op on either); `.cpu()`, `.tolist()` etc. always count.
Only what runs inside a decoder is counted (`decode()` arms the mode; request checks and building trajectories
happen outside it). `steps` counts decoding forwards (`note_step`, called by state.forward_at).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

# Calls that read a device value back to the host (or need its size): each is one sync on an accelerator.
_SYNC_OPS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "nonzero",
             "argwhere", "numpy", "cpu", "equal", "allclose", "masked_select", "unique", "unique_consecutive",
             "bincount"}
# Calls that turn host data into a tensor on a named device: a blocking copy on an accelerator.
_H2D_OPS = {"tensor", "as_tensor"}


@dataclass
class SyncCounts:
    syncs: int = 0
    steps: int = 0
    h2d_copies: int = 0  # blocking host -> device copies of Python data
    async_h2d_copies: int = 0  # one non-blocking copy of a (pinned) host buffer (state.host_columns)
    ops: Counter = field(default_factory=Counter)  # op name -> syncs it made

    @property
    def syncs_per_step(self) -> float:
        return self.syncs / self.steps if self.steps else 0.0

    @property
    def h2d_per_step(self) -> float:
        return (self.h2d_copies + self.async_h2d_copies) / self.steps if self.steps else 0.0


_ACTIVE: list[SyncCounts] = []


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _names_cpu(args, kwargs) -> bool:
    targets = list(args[1:2]) + [kwargs.get("device")]
    return any(t == "cpu" or (isinstance(t, torch.device) and t.type == "cpu") for t in targets if t is not None)


def _classify(name: str, args, kwargs) -> str | None:
    if name in _SYNC_OPS:
        return "sync"
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_bool_index(args[1]):
        return "sync"  # boolean-mask indexing sizes its result from the mask
    if name in ("index_put", "index_put_") and len(args) > 1 and _is_bool_index(tuple(args[1])):
        return "sync"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and not isinstance(
            args[1] if len(args) > 1 else kwargs.get("repeats"), int):
        return "sync"
    if name == "where" and len(args) == 1 and not kwargs:
        return "sync"
    on_host = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" if args else True
    if name == "to" and _names_cpu(args, kwargs) and not on_host:
        return "sync"  # only a real copy to the host: `.to(device)` onto the tensor's own device is a no-op
    if name in _H2D_OPS and kwargs.get("device") is not None:
        return "h2d"
    return None


class _CountingMode(TorchFunctionMode):
    def __init__(self, counts: SyncCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = _classify(name, args, kwargs)
        if kind == "sync":
            self.counts.syncs += 1
            self.counts.ops[name] += 1
        elif kind == "h2d":
            self.counts.h2d_copies += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs():
    """Count host syncs, host -> device copies and decoding steps of every decode run inside the block."""
    counts = SyncCounts()
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)


@contextmanager
def counting():
    """Arms the counting mode while a decoder runs (a no-op unless count_host_syncs is active)."""
    if not _ACTIVE:
        yield
        return
    with _CountingMode(_ACTIVE[-1]):
        yield


def note_step() -> None:
    if _ACTIVE:
        _ACTIVE[-1].steps += 1


def note_async_copy() -> None:
    if _ACTIVE:
        _ACTIVE[-1].async_h2d_copies += 1
