"""Remasking policies: which of the sampled positions of a block a denoising step keeps (unmasks).

Each policy is a small class registered by name. `select` sees one request's masked positions of the current
block (in position order) and returns the indices (into those positions) to unmask now; it never returns an empty
selection while positions remain, so every step makes progress. Randomness comes only from the request's own
generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.sampling import SamplingParams

REMASKING: dict[str, type["RemaskingPolicy"]] = {}


def register_remasking(name: str):
    def wrap(cls):
        if name in REMASKING:
            raise ValueError(f"remasking policy {name!r} registered twice")
        cls.name = name
        REMASKING[name] = cls
        return cls
    return wrap


@dataclass
class RemaskingPolicy:
    """Base: `count` is the schedule's token budget for this step (used by fixed-count policies)."""

    params: SamplingParams
    name = "base"
    fixed_count = True  # unmasks exactly the schedule's count (else it decides itself)
    needs_entropy = False

    def select(self, confidence: torch.Tensor, entropy: torch.Tensor | None, count: int,
               generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


@register_remasking("sequential")
class Sequential(RemaskingPolicy):
    """Left to right: the first `count` masked positions (autoregressive order within the block)."""

    def select(self, confidence, entropy, count, generator):
        return torch.arange(min(count, confidence.numel()), device=confidence.device)


@register_remasking("low_confidence_static")
class LowConfidenceStatic(RemaskingPolicy):
    """The `count` most confident positions (LLaDA's low_confidence remasking)."""

    def select(self, confidence, entropy, count, generator):
        return torch.topk(confidence, min(count, confidence.numel())).indices


@register_remasking("low_confidence_dynamic")
class LowConfidenceDynamic(RemaskingPolicy):
    """Every position whose confidence exceeds the threshold, and at least `min_tokens_per_step` (TraDo)."""

    fixed_count = False

    def select(self, confidence, entropy, count, generator):
        above = (confidence > self.params.threshold).nonzero().squeeze(-1)
        floor = min(self.params.min_tokens_per_step, confidence.numel())
        if above.numel() >= floor:
            return above
        return torch.topk(confidence, floor).indices


@register_remasking("entropy_bounded")
class EntropyBounded(RemaskingPolicy):
    """Lowest-entropy positions first, as many as keep the summed entropy within the bound (EB-sampler)."""

    fixed_count = False
    needs_entropy = True

    def select(self, confidence, entropy, count, generator):
        order = torch.argsort(entropy, stable=True)
        within = int((entropy[order].cumsum(0) <= self.params.entropy_bound).sum())
        take = max(within, min(self.params.min_tokens_per_step, entropy.numel()))
        return order[:take]


@register_remasking("random")
class RandomRemasking(RemaskingPolicy):
    """`count` positions uniformly at random (LLaDA's random remasking), from the request's generator."""

    def select(self, confidence, entropy, count, generator):
        n = confidence.numel()
        return torch.randperm(n, generator=generator, device=generator.device if generator is not None
                              else confidence.device)[:min(count, n)].to(confidence.device)


def make_remasking(params: SamplingParams) -> RemaskingPolicy:
    return REMASKING[params.remasking](params)
