"""Putting a rollout engine's weights to sleep between rollouts (colocated runs give the memory to the learner).

`WeightSleep` empties every storage of a module (parameters and buffers; tied weights counted once) and restores
it bitwise. On an accelerator the bytes go to host memory (pinned under CUDA); on CPU, where host memory is the
memory to free, they go to an unnamed temporary file (deleted when closed), read back on wake.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


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
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)  # noqa: SIM115 (open until wake)
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
