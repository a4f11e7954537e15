"""The learner -> rollout weight wire format, defined once for both sides.

An update is a stream of chunks `(version, [(name, tensor), ...])`; every chunk of one update carries the same
version. Names are the plain causal-LM parameter names (`model.layers.0.mlp.up_proj.weight`; PEFT's `.base_layer`
removed). Three entry kinds:
- full tensor             `name`                          -> copied over the parameter
- row slice of a tensor   `name@start:stop`               -> rows start..stop of dim 0 (a tensor larger than a
                                                              bucket is cut so no chunk exceeds the limit)
- LoRA delta of a linear  `module.lora_A` (r, in), `module.lora_B` (out, r), `module.lora_scaling` (0-d float64)
                                                           -> weight = W0 + (lora_B @ lora_A) * scaling
LoRA parts always travel whole (they are r * (in + out) per projection), never as row slices.

The sender lives in rl/weight_sync.py, the receiver in rollout/weight_receiver.py; rl imports this module, rollout
never imports rl.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

Entry = tuple[str, torch.Tensor]
Chunk = tuple[int, list[Entry]]

LORA_PARTS = ("lora_A", "lora_B", "lora_scaling")
LORA_SUFFIXES = tuple(f".{part}" for part in LORA_PARTS)
_SLICE = re.compile(r"^(?P<name>.+)@(?P<start>\d+):(?P<stop>\d+)$")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def slice_name(name: str, start: int, stop: int) -> str:
    """Wire name of rows start..stop of tensor `name`."""
    return f"{name}@{start}:{stop}"


def parse_slice(name: str) -> tuple[str, int, int] | None:
    """(tensor name, start, stop) of a row-slice entry, None for any other entry."""
    match = _SLICE.match(name)
    return (match["name"], int(match["start"]), int(match["stop"])) if match else None


def is_lora_part(name: str) -> bool:
    return name.endswith(LORA_SUFFIXES)


def lora_delta(lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's delta weight of a Linear: (B @ A) * scaling (both sides compute it exactly so)."""
    return (lora_b @ lora_a) * scaling


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
