"""Remasking policies: which of the sampled positions of a block a denoising step keeps (unmasks).

Each policy is a small class registered by name. `select` sees one request's masked positions of the current
block (in position order) and returns the indices (into those positions) to unmask now. Fixed-count policies take
the schedule's count (rollout/decoding/schedules.py); the others decide themselves and never return an empty
selection while positions remain, except Dream's `origin`, whose last step transfers everything. Randomness comes
only from the request's own generator.

Dream's `diffusion_generate` algorithms: `maskgit_plus` is `low_confidence_static` (the most probable sampled
tokens), `topk_margin` ranks by the top-1 minus top-2 probability, `entropy` by Dream's negative entropy, and
`origin` transfers each masked token independently; all use the step schedule of the model family (Dream's for
Dream checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.sampling import SamplingParams

REMASKING: dict[str, type["RemaskingPolicy"]] = {}


@dataclass
class BlockQueries:
    """The masked positions of a batch of rows, as the decoder already knows them (so a policy that must work row
    by row finds each row's positions without reading the mask back on the host): `rows`, `cols` (N,) on the
    device, row-major in ascending columns; `counts` and `budget` per row on the host."""

    rows: torch.Tensor
    cols: torch.Tensor
    counts: list[int]
    budget: list[int]

    def row_cols(self) -> list[torch.Tensor]:
        """Each row's masked columns (slices of `cols` at host-known offsets)."""
        out, start = [], 0
        for n in self.counts:
            out.append(self.cols[start:start + n])
            start += n
        return out


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
    needs_transfer_probability = False  # select_batch takes `probability` (R,): Dream's 1 - s/t per row
    ranks_by_confidence = True  # the ranking key is the sampled token's probability (what EOSER rescales)
    revisits_decoded = False  # may mask again positions decoded at earlier steps of the block (RCR: keep_batch)

    def selection_key(self, logp_all: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """(n,) score each masked position is ranked by (higher first), from the (n, V) log-probs of the sampling
        distribution and the sampled tokens' probabilities; the default is the confidence itself."""
        return confidence

    def select(self, confidence: torch.Tensor, entropy: torch.Tensor | None, count: int,
               generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def select_batch(self, confidence: torch.Tensor, entropy: torch.Tensor | None, masked: torch.Tensor,
                     count: torch.Tensor, generators: list, *, queries: BlockQueries) -> torch.Tensor:
        """`select` for several rows at once: (R, bs) confidence (-inf where not masked), entropy (+inf where not
        masked) and `masked`, count (R,) on the device, `queries` the same positions and counts as the host knows
        them; returns the (R, bs) bool choice. The default loops over rows (for policies that draw random numbers,
        which must come from each row's own generator in its own order); it reads nothing back on the host."""
        chosen = torch.zeros_like(masked)
        for i, cols in enumerate(queries.row_cols()):
            ent = entropy[i, cols] if entropy is not None else None
            chosen[i, cols[self.select(confidence[i, cols], ent, queries.budget[i], generators[i])]] = True
        return chosen


def _rank(key: torch.Tensor, descending: bool) -> torch.Tensor:
    """(R, n): each entry's place in its row's stable sort (ties: lower column first, as in a stable sort of the
    row's masked entries alone, so a row's choice does not depend on the rest of the batch)."""
    order = torch.sort(key, dim=1, descending=descending, stable=True).indices
    places = torch.arange(key.shape[1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


@register_remasking("sequential")
class Sequential(RemaskingPolicy):
    """Left to right: the first `count` masked positions (autoregressive order within the block)."""

    def select(self, confidence, entropy, count, generator):
        return torch.arange(min(count, confidence.numel()), device=confidence.device)

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries=None):
        return masked & (masked.cumsum(dim=1) <= count[:, None])


@register_remasking("left_to_right")
class LeftToRight(RemaskingPolicy):
    """AR order (JustGRPO): exactly one token per step, the leftmost masked position, whatever the step schedule,
    so every token is sampled from the model's distribution at that position given the decoded prefix and the
    masks after it (the rest of the canvas, within the model's attention)."""

    fixed_count = False  # never the schedule's count: always one

    def select(self, confidence, entropy, count, generator):
        return torch.arange(min(1, confidence.numel()), device=confidence.device)

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries=None):
        return masked & (masked.cumsum(dim=1) == 1)


@register_remasking("low_confidence_static")
class LowConfidenceStatic(RemaskingPolicy):
    """The `count` most confident positions (LLaDA's low_confidence remasking)."""

    def select(self, confidence, entropy, count, generator):
        return torch.topk(confidence, min(count, confidence.numel())).indices

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries=None):
        return masked & (_rank(confidence, descending=True) < count[:, None])


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

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries=None):
        above = masked & (confidence > self.params.threshold)
        floor = masked.sum(dim=1).clamp(max=self.params.min_tokens_per_step)
        fallback = masked & (_rank(confidence, descending=True) < floor[:, None])
        return torch.where((above.sum(dim=1) >= floor)[:, None], above, fallback)


@register_remasking("threshold_schedule")
class ThresholdSchedule(RemaskingPolicy):
    """LLaDA2's generate: every position whose confidence exceeds the threshold when there are at least the step's
    scheduled count of them, else the scheduled count most confident (the schedule: steps_per_block's even split)."""

    fixed_count = False

    def select(self, confidence, entropy, count, generator):
        above = (confidence > self.params.threshold).nonzero().squeeze(-1)
        if above.numel() >= count:
            return above
        return torch.topk(confidence, min(count, confidence.numel())).indices

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries=None):
        above = masked & (confidence > self.params.threshold)
        fallback = masked & (_rank(confidence, descending=True) < count[:, None])
        return torch.where((above.sum(dim=1) >= count)[:, None], above, fallback)


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

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries=None):
        order = torch.sort(entropy, dim=1, stable=True).indices
        # Unmasked entries sort last (+inf), so each row's cumulative sum over its masked entries is the same
        # sequence of additions as `select`'s.
        within = (entropy.gather(1, order).cumsum(dim=1) <= self.params.entropy_bound).sum(dim=1)
        take = torch.maximum(within, masked.sum(dim=1).clamp(max=self.params.min_tokens_per_step))
        return masked & (_rank(entropy, descending=False) < take[:, None])


@register_remasking("random")
class RandomRemasking(RemaskingPolicy):
    """`count` positions uniformly at random (LLaDA's random remasking), from the request's generator."""

    def select(self, confidence, entropy, count, generator):
        n = confidence.numel()
        return torch.randperm(n, generator=generator, device=generator.device if generator is not None
                              else confidence.device)[:min(count, n)].to(confidence.device)


@register_remasking("topk_margin")
class TopkMargin(LowConfidenceStatic):
    """Dream's `topk_margin`: the `count` positions with the largest top-1 minus top-2 probability."""

    ranks_by_confidence = False

    def selection_key(self, logp_all, confidence):
        top2 = torch.topk(logp_all.exp(), 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


@register_remasking("entropy")
class LowestEntropy(LowConfidenceStatic):
    """Dream's `entropy`: the `count` positions of lowest entropy, scored as Dream does, sum p * log(p + 1e-10)
    (the 1e-10 keeps log finite; over a large vocabulary it shifts the score by up to ~V * 1e-10, so it is kept
    to rank near-ties as Dream does)."""

    ranks_by_confidence = False

    def selection_key(self, logp_all, confidence):
        probs = logp_all.exp()
        return (probs * torch.log(probs + 1e-10)).sum(dim=-1)


@register_remasking("origin")
class Origin(RemaskingPolicy):
    """Dream's `origin`: each masked position is unmasked independently with probability 1 - s/t (Dream's step
    schedule; 1 at the last step), one uniform per masked position, in position order, from the request's
    generator. A step may unmask nothing; the last one unmasks everything left."""

    fixed_count = False
    needs_transfer_probability = True
    ranks_by_confidence = False

    def select(self, confidence, entropy, count, generator, probability: float = 1.0):
        u = torch.rand(confidence.numel(), generator=generator,
                       device=generator.device if generator is not None else confidence.device)
        return (u.to(confidence.device) < probability).nonzero().squeeze(-1)

    def select_batch(self, confidence, entropy, masked, count, generators, *, queries, probability=None):
        if probability is None:
            raise ValueError("origin remasking needs each row's transfer probability")
        # The same uniforms as `select` (one per masked position, row by row from each row's generator), compared
        # in float32 as `select` compares them with a Python float, written without reading anything back.
        u = torch.cat([torch.rand(n, generator=g, device=g.device if g is not None else masked.device)
                       .to(masked.device) for n, g in zip(queries.counts, generators)])
        chosen = torch.zeros_like(masked)
        chosen[queries.rows, queries.cols] = u < probability.to(u.dtype)[queries.rows]
        return chosen


@register_remasking("rcr")
class RunningConfidence(LowConfidenceStatic):
    """MDPO's running-confidence remasking (RCR, autonomousvision/mdpo src/mdlm_generation_utils.py): every masked
    position of the block is sampled at each step and, with the block's already decoded positions, ranked by its
    running confidence (the score of its token when it was last sampled); the block then keeps the schedule's
    cumulative count of top-ranked positions decoded and masks the rest again, so an early low-confidence token
    can be revised later. Within the current block only (the reference ranks the whole canvas; MDPO's published
    setting decodes one block). The choice is made by `keep_batch`; `select` alone cannot express a remask."""

    revisits_decoded = True

    def keep_batch(self, key: torch.Tensor, running: torch.Tensor, masked: torch.Tensor, fixed: torch.Tensor,
                   count: torch.Tensor) -> torch.Tensor:
        """(R, bs) positions decoded after the step: the top (decoded before + count) by running confidence, where
        `key` (-inf where not masked) scores the new samples, `running` the decoded positions, `fixed` positions
        (prompt tail in the block) always stay."""
        score = torch.where(masked, key, running)
        score = torch.where(fixed, torch.full_like(score, float("inf")), score)
        keep = (~masked).sum(dim=1) + count
        return _rank(score, descending=True) < keep[:, None]


def make_remasking(params: SamplingParams) -> RemaskingPolicy:
    return REMASKING[params.remasking](params)
