"""What every likelihood estimator takes and returns.

An estimator turns a batch of (prompt, response) pairs into log-likelihood estimates under a policy:
per token (`token_logp`, for token-level losses) and per sequence (`seq_logp`, for GDPO/SPG), plus the bookkeeping
losses need. Randomness comes only from per-sample generators seeded from (base seed, sample key, inner
iteration) by `rl.masking.sample_generator`, so the old, reference and current policies of one sample see the
same masks whatever the batch shape. Every estimator also takes `packing` (rollout.models.layout.RowPacking, or None):
its scoring forwards then lay several samples in one row (the learner's pack_tokens); the estimate is the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rl.registry import Registry
from rollout.models.layout import layout_length
from rollout.models.masks import check_alignment

ESTIMATORS = Registry("estimator")


@dataclass
class EstimatorInput:
    prompts: list[torch.Tensor]  # (P_b,) long each
    responses: list[torch.Tensor]  # (L_b,) long each: whole decoded blocks
    sample_keys: list[str]  # stable identity of each sample (e.g. request id): seeds its masks
    valid_lengths: list[int] | None = None  # tokens that count (through the first EOS); default: all
    step_maps: list[torch.Tensor] | None = None  # (L_b,) decoding step per token (trajectory estimator)
    block_size: int | None = None  # the rollout's block size (trajectory estimator); default: policy's
    canvas_traces: list | None = None  # rollout.canvas_trace.CanvasTrace per sample (canvas_trace estimator)
    # (L_b,) bool or None per sample: positions never counted by a loss (IGPO's pre-filled hints: tokens the
    # policy did not choose); None: none
    frozen: list[torch.Tensor | None] | None = None
    token_entropies: list[torch.Tensor] | None = None  # (L_b,) rollout sampling entropy per token (AGRPO)

    def __len__(self) -> int:
        return len(self.responses)

    def length(self, b: int) -> int:
        return int(self.responses[b].numel())

    def valid_length(self, b: int) -> int:
        return self.length(b) if self.valid_lengths is None else int(self.valid_lengths[b])

    def select(self, index: list[int]) -> "EstimatorInput":
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return EstimatorInput(pick(self.prompts), pick(self.responses), pick(self.sample_keys),
                              pick(self.valid_lengths), pick(self.step_maps), self.block_size,
                              pick(self.canvas_traces), pick(self.frozen), pick(self.token_entropies))


@dataclass
class Estimate:
    token_logp: torch.Tensor  # (B, Lmax) per-token contribution; sums over tokens to seq_logp
    seq_logp: torch.Tensor  # (B,) sequence log-likelihood estimate (an ELBO for the ELBO estimators)
    token_mask: torch.Tensor  # (B, Lmax) bool: tokens counted by losses
    forwards: int  # model forward passes spent on the batch
    step_ids: torch.Tensor | None = None  # (B, Lmax) step group of each token (trajectory estimator)
    entropy: torch.Tensor | None = None  # (B, Lmax) predictive entropy where scored
    hidden: torch.Tensor | None = None  # (B, Lmax, H) hidden state at each noisy response position
    extra: dict[str, Any] = field(default_factory=dict)


def block_alignment_option(block_alignment: str | None) -> str | None:
    """An estimator's `block_alignment` option: None or "model" (the model's own alignment) -> None, anything else
    checked (absolute | response)."""
    if block_alignment is None or block_alignment == "model":
        return None
    return check_alignment(block_alignment)


def padded(rows: list[torch.Tensor], width: int, fill=0, dtype=None) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype or rows[0].dtype)
    for b, row in enumerate(rows):
        out[b, : row.numel()] = row
    return out


def token_mask_of(inp: EstimatorInput, device=None) -> torch.Tensor:
    width = max(inp.length(b) for b in range(len(inp)))
    mask = torch.zeros((len(inp), width), dtype=torch.bool, device=device)
    for b in range(len(inp)):
        mask[b, : inp.valid_length(b)] = True
        if inp.frozen is not None and inp.frozen[b] is not None:
            frozen = inp.frozen[b].to(device=mask.device, dtype=torch.bool)
            mask[b, : frozen.numel()] &= ~frozen
    return mask


def layout_tokens(estimator, spec, inp: EstimatorInput, params: dict[str, Any]) -> list[int]:
    """Per sample, the positions of the longest layout `estimator` scores it in: its own count where it lays
    several noisy canvases in one forward (an estimator's `layout_tokens` attribute, e.g. the trajectory
    estimator's one-forward path), else one `[prompt | clean | noisy]` layout."""
    own = getattr(estimator, "layout_tokens", None)
    if own is not None:
        return own(spec, inp, **params)
    return [layout_length(spec, inp.prompts[b].numel(), inp.length(b)) for b in range(len(inp))]
