"""CanvasTrace: what a re-noising canvas sampler (DiffusionGemma's entropy-bounded sampler) did, step by step.

A masked-diffusion trajectory is summed up by one step per token (Trajectory.step_map). A uniform-noise sampler is
not: every step re-predicts the whole canvas, accepts the lowest-entropy positions and replaces every other
position by a fresh uniformly random token, so a position can be accepted many times and the canvas a step reads
holds random tokens that no mask rule can reconstruct. The trace therefore records every canvas as the decoder read
it (random tokens included) and which positions each step accepted; the learner replays the steps on exactly these
canvases (rl/estimators/canvas_trace.py).

Actions: the tokens a step accepts are written into the canvas the next step of the same block reads, so step s
acted at position i iff accepted[s, i] and step s + 1 belongs to the same block; the token is canvases[s + 1, i].
What a block's last step accepts is thrown away by the sampler (a block's output is that step's argmax canvas), so
it is no action: its draw cannot change the response, and its score term would only add variance.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch


@dataclass
class CanvasTrace:
    canvases: torch.Tensor  # (S, C) long: the canvas each executed step read, in order over all blocks
    accepted: torch.Tensor  # (S, C) bool: positions the step's acceptance rule kept (the rest were re-noised)
    block: torch.Tensor  # (S,) long: response block (0-based) of each step
    remaining: torch.Tensor  # (S,) long: transformers' step counter n = N..1 (the temperature schedule reads it)
    action_logprobs: torch.Tensor  # (S, C) float: rollout log-prob of each action's token (0 where no action)
    prompt_offset: int  # left padding of the row in its rollout batch (absolute positions count it, as generate)
    max_denoising_steps: int  # N of the schedule t(n) = t_min + (t_max - t_min) n / N
    t_min: float | None  # None (with t_max None): no temperature processing
    t_max: float | None

    @property
    def num_steps(self) -> int:
        return int(self.block.numel())

    @property
    def canvas_length(self) -> int:
        return int(self.canvases.shape[1])

    def has_successor(self) -> torch.Tensor:
        """(S,) bool: step s is followed by a step of the same block (so what it accepted was kept)."""
        same = torch.zeros_like(self.block, dtype=torch.bool)
        same[:-1] = self.block[1:] == self.block[:-1]
        return same

    def actions(self) -> torch.Tensor:
        """(S, C) bool: (step, position) pairs whose sampled token entered the next canvas."""
        return self.accepted & self.has_successor()[:, None]

    def action_tokens(self) -> torch.Tensor:
        """(S, C) long: the token of each action (the next canvas at that position); garbage where no action."""
        nxt = torch.zeros_like(self.canvases)
        nxt[:-1] = self.canvases[1:]
        return nxt

    def validate(self, response_length: int) -> None:
        """Raise ValueError naming the first field that breaks the contract."""
        s, c = self.canvases.shape if self.canvases.dim() == 2 else (-1, -1)
        if s < 1:
            raise ValueError(f"canvas_trace.canvases: shape {tuple(self.canvases.shape)} is not (steps >= 1, C)")
        for name in ("accepted", "action_logprobs"):
            if tuple(getattr(self, name).shape) != (s, c):
                raise ValueError(f"canvas_trace.{name}: shape {tuple(getattr(self, name).shape)} != ({s}, {c})")
        for name in ("block", "remaining"):
            if tuple(getattr(self, name).shape) != (s,):
                raise ValueError(f"canvas_trace.{name}: shape {tuple(getattr(self, name).shape)} != ({s},)")
        if bool((self.block[1:] < self.block[:-1]).any()) or int(self.block[0]) != 0:
            raise ValueError("canvas_trace.block: steps must run block 0, 1, ... in order")
        blocks = int(self.block[-1]) + 1
        if blocks * c != response_length:
            raise ValueError(f"canvas_trace: {blocks} blocks of {c} tokens != response length {response_length}")
        if bool((self.remaining < 1).any()) or bool((self.remaining > self.max_denoising_steps).any()):
            raise ValueError(f"canvas_trace.remaining: outside [1, {self.max_denoising_steps}]")
        if self.prompt_offset < 0:
            raise ValueError(f"canvas_trace.prompt_offset: {self.prompt_offset} < 0")

    # ------------------------------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """safetensors bytes (tensors + scalar metadata): what the trajectory store keeps (no pickle)."""
        from safetensors.torch import save

        meta = {"prompt_offset": str(self.prompt_offset), "max_denoising_steps": str(self.max_denoising_steps),
                "t_min": repr(self.t_min), "t_max": repr(self.t_max)}
        tensors = {"canvases": self.canvases.to(torch.int32).contiguous(), "accepted": self.accepted.contiguous(),
                   "block": self.block.to(torch.int32).contiguous(),
                   "remaining": self.remaining.to(torch.int32).contiguous(),
                   "action_logprobs": self.action_logprobs.float().contiguous()}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CanvasTrace":
        from safetensors.torch import load

        tensors = load(data)
        header_len = struct.unpack("<Q", data[:8])[0]  # safetensors: u64 header length, JSON header (metadata)
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        as_float = lambda v: None if v == "None" else float(v)
        return cls(tensors["canvases"].long(), tensors["accepted"].bool(), tensors["block"].long(),
                   tensors["remaining"].long(), tensors["action_logprobs"].float(), int(meta["prompt_offset"]),
                   int(meta["max_denoising_steps"]), as_float(meta["t_min"]), as_float(meta["t_max"]))
