"""The rollout memory budget that sizes the KV cache (no torch import at module level: recipes validate with it).

Memory budget (recipe `rollout.memory_budget`, engine option `memory_budget`): how much memory the KV cache of
one generate call may take, as
- a fraction in (0, 1] of the memory free when generate starts: on an accelerator what
  `torch.cuda.mem_get_info()` reports free on its device (after the weights and anything a colocated learner
  holds) plus what torch's caching allocator holds unused in this process; on CPU the host's `MemAvailable` (/proc/meminfo), the memory the kernel can give without swapping;
- or bytes: an int, or a string with a unit "512MiB", "2GiB", "1.5GB" (binary and decimal units; a unit-less
  string such as "0.9" is refused as ambiguous, and so is anything above 1 PiB).
Activations of a forward are not counted (they are freed layer by layer and are small next to the cache at long
contexts): leave headroom.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
MAX_BYTES = 2 ** 50  # 1 PiB: no device has more; a larger size is a typo, not a budget


@dataclass(frozen=True)
class MemoryBudget:
    """Either `fraction` of the memory free at generate time or a fixed number of `bytes`."""

    fraction: float | None = None
    bytes: int | None = None

    def resolve(self, device) -> int:
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
        if not 1 <= value <= MAX_BYTES:
            raise ValueError(f"{field}: bytes must lie in [1, 2**50], got {value}")
        return MemoryBudget(bytes=value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{field}: {value!r} is not a size like '512MiB', '2GiB' or '1.5GB'")
        if not unit:  # "0.9" (a quoted fraction?) or "512" (bytes?): ambiguous, as a bare int is in a recipe
            raise ValueError(f"{field}: {value!r} has no unit: write a size ('512MiB') or a fraction as a number "
                             "(0.9, unquoted)")
        size = int(float(match.group(1)) * _UNITS[unit])
        if not 1 <= size <= MAX_BYTES:
            raise ValueError(f"{field}: {value!r} is {size} bytes, outside [1, 2**50]")
        return MemoryBudget(bytes=size)
    raise ValueError(f"{field}: expected a fraction in (0, 1] or a size like '2GiB', got {type(value).__name__}")


def free_memory(device) -> int:
    """Bytes free for new tensors on `device` (a torch.device or its name; see the module docstring)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        # Blocks torch's caching allocator holds unused (e.g. the last rollout's cache) are free to this process.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
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
