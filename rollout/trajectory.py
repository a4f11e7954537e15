"""The record of one generated response: everything the learner needs, as token ids and tensors.

A Trajectory crosses actor boundaries (rollout -> reward -> store -> learner), so it holds no text that would
have to be re-tokenized and no reference to a model. Tensors are 1-D CPU tensors of the response length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rollout.canvas_trace import CanvasTrace

# A response token that has not been decoded yet has no step; never stored in a finished trajectory.
UNDECODED = -1
# The step of a pre-filled token (GenerationRequest.prefill): in the canvas before step 0, so every recorded state
# (state_before_step) shows it; its log-prob and confidence are 0 (never sampled).
PREFILLED = -2


def block_local_steps(step_map: torch.Tensor, block_size: int, head: int = 0) -> torch.Tensor:
    """For each token, the index j of the denoising step within its own block that unmasked it.

    TraceRL's pass j trains, in every block at once, the tokens of that block's j-th step. With dynamic decoding
    blocks take different numbers of steps, so j is the rank of the token's step among its block's distinct steps.
    `head`: prompt tokens in the first block (`absolute` alignment, masks.py), so the first block holds only
    block_size - head response tokens.
    """
    if not 0 <= head < block_size:
        raise ValueError(f"block_local_steps: head {head} outside [0, block size {block_size})")
    local = torch.empty_like(step_map)
    bounds = [0, *range(block_size - head if head else block_size, step_map.numel(), block_size), step_map.numel()]
    for start, end in zip(bounds[:-1], bounds[1:]):
        steps = step_map[start:end]
        local[start:end] = torch.searchsorted(torch.unique(steps), steps)
    return local


@dataclass
class Trajectory:
    prompt_ids: torch.Tensor  # (P,) long: the prompt exactly as the model saw it (no padding)
    response_ids: torch.Tensor  # (L,) long: every decoded position, whole blocks (tokens after EOS included)
    step_map: torch.Tensor  # (L,) long: global denoising step (0-based) at which each token was unmasked
    logprobs: torch.Tensor  # (L,) float: log-prob of the token under the distribution it was sampled from
    confidence: torch.Tensor  # (L,) float: the score the remasking policy ranked the token by
    valid_length: int  # tokens up to and including the first EOS (== L when no EOS)
    nfe: int  # forward passes spent on this request
    finish_reason: str  # "eos" | "length" | "error: ..."
    block_size: int  # decoding block; where blocks start: sampling["block_alignment"] (rollout/models/masks.py)
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_k, top_p, remasking, steps, seed...
    policy_version: int = 0
    request_id: str = ""  # what the driver scores it by is in rl.sample.ScoredSample, not here
    # Re-noising canvas samplers (DiffusionGemma): every canvas each step read and what it accepted (canvas_trace.py)
    canvas_trace: CanvasTrace | None = None
    prefilled: torch.Tensor | None = None  # (L,) bool: pre-filled positions (IGPO's inpainting); None: none
    # Per denoising step s (sampling["record_steps"]; None otherwise), each (S, L): the response canvas just before
    # step s (mask id where masked), the canvas with step s's sampled token at every masked position of its block
    # (MDPO's intermediate answer), and those tokens' sampling probabilities (0 elsewhere). Needed where the step
    # map cannot replay the decoding (a remasking policy that masks decoded tokens again, e.g. RCR).
    step_states: torch.Tensor | None = None
    step_predictions: torch.Tensor | None = None
    step_confidence: torch.Tensor | None = None
    # (L,) entropy of the distribution each token was sampled from (sampling["record_entropy"]; None otherwise)
    token_entropy: torch.Tensor | None = None

    @property
    def response_length(self) -> int:
        return int(self.response_ids.numel())

    @property
    def num_steps(self) -> int:
        return int(self.step_map.max().item()) + 1 if self.step_map.numel() else 0

    def state_before_step(self, step: int, mask_token_id: int) -> torch.Tensor:
        """Response as the decoder saw it just before `step`: tokens unmasked at `step` or later are masks.

        Positions of blocks not reached yet are masks too (their steps are all later), which is exactly the
        canvas a full-attention decoder saw; a block decoder never saw them at all.
        """
        state = self.response_ids.clone()
        state[self.step_map >= step] = mask_token_id
        return state

    @property
    def block_head(self) -> int:
        """Prompt tokens in the first decoding block (P mod B under `absolute` alignment, else 0)."""
        if self.sampling.get("block_alignment") == "absolute":
            return self.prompt_ids.numel() % self.block_size
        return 0

    def block_local_steps(self) -> torch.Tensor:
        return block_local_steps(self.step_map, self.block_size, self.block_head)

    def validate(self) -> None:
        """Raise ValueError naming the first field that breaks the contract."""
        n = self.response_length
        for name in ("step_map", "logprobs", "confidence"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"trajectory.{name}: shape {tuple(value.shape)} != response shape ({n},)")
        sampled = self.step_map
        if self.prefilled is not None:
            if self.prefilled.shape != (n,):
                raise ValueError(f"trajectory.prefilled: shape {tuple(self.prefilled.shape)} != response shape ({n},)")
            if bool((self.step_map[self.prefilled.bool()] != PREFILLED).any()):
                raise ValueError(f"trajectory.step_map: a pre-filled position has a step other than {PREFILLED}")
            sampled = self.step_map[~self.prefilled.bool()]
        if sampled.numel() and int(sampled.min()) < 0:
            raise ValueError("trajectory.step_map: a response token was never unmasked")
        if not 0 <= self.valid_length <= n:
            raise ValueError(f"trajectory.valid_length: {self.valid_length} outside [0, {n}]")
        if self.block_size < 1:
            raise ValueError(f"trajectory.block_size: {self.block_size} < 1")
        if self.canvas_trace is not None:
            self.canvas_trace.validate(n)
        if self.token_entropy is not None and self.token_entropy.shape != (n,):
            raise ValueError(f"trajectory.token_entropy: shape {tuple(self.token_entropy.shape)} != ({n},)")
        records = [self.step_states, self.step_predictions, self.step_confidence]
        if any(r is not None for r in records):
            if any(r is None for r in records):
                raise ValueError("trajectory.step_states: step_states, step_predictions and step_confidence go "
                                 "together")
            for name, value in zip(("step_states", "step_predictions", "step_confidence"), records):
                if value.dim() != 2 or value.shape[1] != n or value.shape[0] != records[0].shape[0]:
                    raise ValueError(f"trajectory.{name}: shape {tuple(value.shape)} is not (steps, {n})")
