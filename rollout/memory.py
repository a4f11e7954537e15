"""Rollout memory: the budget that sizes the KV cache, and putting an engine's weights to sleep between rollouts.

Memory budget (recipe `rollout.memory_budget`, engine option `memory_budget`): how much memory the KV cache of
one generate call may take, as
- a fraction in (0, 1] of the memory free when generate starts: on an accelerator what
  `torch.cuda.mem_get_info()` reports free on its device (after the weights and anything a colocated learner
  holds); on CPU the host's `MemAvailable` (/proc/meminfo), the memory the kernel can give without swapping;
- or bytes: an int, or a string "512MiB", "2GiB", "1.5GB" (binary and decimal units).
Activations of a forward are not counted (they are freed layer by layer and are small next to the cache at long
contexts): leave headroom.

Sleep: `WeightSleep` empties every storage of a module (parameters and buffers; tied weights counted once) and
restores it bitwise. On an accelerator the bytes go to host memory (pinned under CUDA); on CPU, where host memory
is the memory to free, they go to an unnamed temporary file (deleted when closed), read back on wake.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class MemoryBudget:
    """Either `fraction` of the memory free at generate time or a fixed number of `bytes`."""

    fraction: float | None = None
    bytes: int | None = None

    def resolve(self, device: torch.device) -> int:
        if self.bytes is not None:
            return self.bytes
        return int(self.fraction * free_memory(device))

    def describe(self) -> str:
        return f"{self.bytes} bytes" if self.bytes is not None else f"{self.fraction:g} of free memory"


def parse_memory_budget(value, field: str = "rollout.memory_budget") -> MemoryBudget | None:
    """None (no budget), a fraction in (0, 1], a positive int of bytes or a size string ("2GiB")."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a fraction in (0, 1] or a size like '2GiB', got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"{field}: a fraction must lie in (0, 1], got {value}")
        return MemoryBudget(fraction=value)
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{field}: bytes must be >= 1, got {value}")
        return MemoryBudget(bytes=value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{field}: {value!r} is not a size like '512MiB', '2GiB' or '1.5GB'")
        size = int(float(match.group(1)) * _UNITS[unit])
        if size < 1:
            raise ValueError(f"{field}: {value!r} is zero bytes")
        return MemoryBudget(bytes=size)
    raise ValueError(f"{field}: expected a fraction in (0, 1] or a size like '2GiB', got {type(value).__name__}")


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        raise ValueError(f"rollout.memory_budget: a fraction needs the free memory of {device.type}, which is not "
                         "measured here; give bytes (e.g. '8GiB')")
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        raise ValueError("rollout.memory_budget: a fraction on CPU reads MemAvailable from /proc/meminfo, absent "
                         "here; give bytes (e.g. '8GiB')")
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("rollout.memory_budget: no MemAvailable in /proc/meminfo; give bytes (e.g. '8GiB')")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _tensors_by_storage(module: torch.nn.Module) -> list[tuple[torch.UntypedStorage, list[torch.Tensor]]]:
    """The module's parameters and buffers grouped by the storage they live in (tied weights share one)."""
    groups: dict[tuple, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        if storage.nbytes():
            groups.setdefault((storage.device, storage.data_ptr()), (storage, []))[1].append(tensor)
    return list(groups.values())


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))


class WeightSleep:
    """Frees a module's weights (each parameter's and buffer's `.data` swapped for an empty tensor: the objects
    stay, so references held elsewhere, e.g. by a WeightReceiver, stay valid; storages loaded from safetensors are
    not resizable, hence the swap) and restores them bitwise, tensors that shared a storage sharing one again."""

    def __init__(self, module: torch.nn.Module, spill_dir: str | Path | None = None):
        self.module = module
        self.spill_dir = spill_dir
        # per storage: (device, nbytes, host copy or file offset, [(tensor, size, stride, storage offset)])
        self._saved: list[tuple[torch.device, int, object, list[tuple]]] = []
        self._file = None

    @property
    def asleep(self) -> bool:
        return bool(self._saved)

    def resident_bytes(self) -> int:
        """Bytes the module's parameters and buffers hold now (distinct storages)."""
        return sum(storage.nbytes() for storage, _ in _tensors_by_storage(self.module))

    def sleep(self) -> int:
        """Move the bytes out and free them; returns the bytes freed (0 when already asleep)."""
        if self._saved:
            return 0
        groups = _tensors_by_storage(self.module)
        if any(storage.device.type == "cpu" for storage, _ in groups):
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)
        freed = 0
        with torch.no_grad():
            for storage, tensors in groups:
                n = storage.nbytes()
                view = _bytes_view(storage)
                if storage.device.type == "cpu":
                    where = self._file.tell()
                    self._file.write(memoryview(view.numpy()))
                else:
                    where = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                    where.copy_(view)
                layout = [(t, t.shape, t.stride(), t.storage_offset()) for t in tensors]
                self._saved.append((storage.device, n, where, layout))
                freed += n
            view = storage = groups = None  # drop every reference to the old storages before freeing them
            if self._file is not None:
                self._file.flush()
            for device, _, _, layout in self._saved:
                for tensor, *_ in layout:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return freed

    def wake(self) -> None:
        """Allocate every storage again and copy its bytes in (bitwise what sleep saw)."""
        if not self._saved:
            return
        with torch.no_grad():
            for device, n, where, layout in self._saved:
                raw = torch.empty(n, dtype=torch.uint8, device=device)
                if isinstance(where, int):
                    self._file.seek(where)
                    if self._file.readinto(memoryview(raw.numpy())) != n:
                        raise RuntimeError("engine wake: the weights' spill file was truncated")
                else:
                    raw.copy_(where)
                for tensor, size, stride, offset in layout:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=device).set_(
                        raw.untyped_storage(), offset, size, stride)
        self._saved = []
        if self._file is not None:
            self._file.close()
            self._file = None
