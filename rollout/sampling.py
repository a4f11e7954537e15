"""Sampling parameters and the per-request token sampler.

Every random number a request consumes comes from its own `torch.Generator`, in an order fixed by the request
alone (one uniform per masked position per step, then whatever its remasking policy draws), so a request decodes
to the same tokens alone or inside any batch.

The recorded log-prob of a token is taken under the distribution it was actually sampled from: logits / T, then
top-k, then top-p, renormalised. Greedy decoding (temperature 0) samples from a point mass, which carries no
information, so it records the untempered, unfiltered model log-prob instead (what a learner recomputes at T=1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

SCHEDULES = ("uniform", "dream", "ass")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_tokens: int = 256  # response length budget; a multiple of the block size
    remasking: str = "low_confidence_dynamic"  # a name in rollout.remasking.REMASKING
    steps_per_block: int | None = None  # fixed-count policies: denoising steps per block (None: one token a step)
    threshold: float = 0.9  # low_confidence_dynamic: unmask every token whose confidence exceeds this
    min_tokens_per_step: int = 1  # dynamic / entropy policies: the floor that guarantees progress
    entropy_bound: float = 1.0  # entropy_bounded: unmask the lowest-entropy tokens while their sum stays below
    # Tokens per step in a block: None = the model family's (DiffusionSpec.step_schedule: LLaDA's "uniform" split,
    # Dream's "dream"), or "uniform", "dream", "ass" (2^i, CJ-GRPO); see rollout/decoding/schedules.py.
    schedule: str | None = None
    eoser_gamma_min: float | None = None  # EOSER: scale EOS confidence by gamma(s) starting at this; None = off
    stop_at_eos: bool = True  # block decoding stops after the block that holds an EOS
    # Record, per denoising step, the canvas before it, the step's sampled tokens at every masked position of the
    # block and their probabilities (Trajectory.step_states / step_predictions / step_confidence; MDPO).
    record_steps: bool = False
    # Record each token's sampling-distribution entropy at the step it was drawn (Trajectory.token_entropy; AGRPO's
    # entropy proposal over steps).
    record_entropy: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.steps_per_block is not None and self.steps_per_block < 1:
            problems.append(f"steps_per_block must be >= 1, got {self.steps_per_block}")
        if self.min_tokens_per_step < 1:
            problems.append(f"min_tokens_per_step must be >= 1, got {self.min_tokens_per_step}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.eoser_gamma_min is not None and not 0 <= self.eoser_gamma_min <= 1:
            problems.append(f"eoser_gamma_min must be in [0, 1], got {self.eoser_gamma_min}")
        from rollout.remasking import REMASKING  # local: remasking imports this module

        if self.remasking not in REMASKING:
            problems.append(f"remasking must be one of {sorted(REMASKING)}, got {self.remasking!r}")
        elif self.eoser_gamma_min is not None and not REMASKING[self.remasking].ranks_by_confidence:
            problems.append(f"eoser_gamma_min rescales confidence, which {self.remasking!r} remasking does not "
                            "rank by")
        if problems:
            raise ValueError("sampling." + problems[0])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"sampling.{unknown[0]}: unknown sampling parameter")
        return cls(**data)


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(n, V) logits -> (n, V) log-probs of the distribution sampling draws from (-inf where filtered out)."""
    logits = logits.float()
    if params.greedy:
        return F.log_softmax(logits, dim=-1)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked strictly above it already reach top_p (the first is always kept).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def sample_tokens(
    logp: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of (n, V) log-probs; return (tokens, their log-probs).

    Inverse-CDF sampling with one uniform per row (drawn from `generator`, or given as (n, 1) `uniforms` when rows
    of several requests are sampled together): a request's generator consumption depends only on its own number
    of rows, whatever V or the values are, which keeps its random stream independent of the rest of the batch.
    """
    if params.greedy:
        tokens = logp.argmax(dim=-1)
    else:
        cdf = logp.exp().cumsum(dim=-1)
        u = uniforms if uniforms is not None else torch.rand(
            logp.shape[0], 1, generator=generator, device=logp.device, dtype=torch.float32)
        u = u.to(cdf.dtype)
        # The first index whose cdf exceeds u * total: never a filtered (zero-probability) token.
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        tokens = tokens.clamp_(max=logp.shape[-1] - 1)
        # u * total can round up to total itself; the clamp then lands on the last id, which may be filtered out.
        landed = logp.gather(-1, tokens[:, None]).squeeze(-1)
        tokens = torch.where(torch.isfinite(landed), tokens, logp.argmax(dim=-1))
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of (n, V) log-probs; filtered (-inf) entries contribute zero."""
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1)


@dataclass
class GenerationRequest:
    """One prompt to decode: token ids (never text), its sampling parameters and its own seed."""

    prompt_ids: torch.Tensor | list[int]
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None  # None: a fresh seed from the OS, recorded in the trajectory
    request_id: str = ""
    # Pre-filled response positions (IGPO's inpainting): (n,) token ids over the first n response positions, -1
    # where the decoder samples. A pre-filled token is in the canvas from the start, never sampled nor remasked,
    # and marked in Trajectory.prefilled. None: none (decoding is exactly what it was without the field).
    prefill: torch.Tensor | list[int] | None = None
    # Tree rollouts (d-TreeRPO): (global step, seed) pairs; at that step the request's generator restarts from that
    # seed. Requests with the same seed and the same pairs up to a step decode identically until it (the shared
    # prefix of a branch), then diverge.
    branch_seeds: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # Shape/content problems are reported per request by the decoder, never raised here.
        if not isinstance(self.prompt_ids, torch.Tensor):
            self.prompt_ids = torch.tensor(list(self.prompt_ids), dtype=torch.long)
        if self.prefill is not None and not isinstance(self.prefill, torch.Tensor):
            self.prefill = torch.tensor(list(self.prefill), dtype=torch.long)
        if isinstance(self.sampling, dict):
            self.sampling = SamplingParams.from_dict(self.sampling)
