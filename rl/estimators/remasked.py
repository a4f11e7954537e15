"""dTRPO's trajectory reduction: the trajectory log-likelihood from ONE forward of a re-masked final state.

A rollout's trajectory probability is the product over its denoising steps of the probability of the tokens newly
unmasked at that step, given the state before it (`rl.estimators.trajectory` scores every step, one forward per
step of a block). dTRPO (Zhang et al., ICML 2026, arXiv 2603.18806) reduces this in two ways:
- the ratio of intermediate states reduces to the ratio of the NEWLY UNMASKED tokens of a step (what the trajectory
  estimator scores already);
- the sum over steps is estimated from one step per block, drawn uniformly: the state before that step is the
  final response re-masked (every token the block decoded at that step or later is the mask token again), and in
  the block-diffusion training layout every block sees only the prompt, the clean earlier blocks and itself, so the
  re-masked states of ALL blocks are scored in one forward pass.

Estimate (block b has S_b distinct decoding steps, j_b ~ U{0..S_b-1} drawn from the sample's own generator):
    seq_logp = sum_b S_b * sum_{i in block b, local step i == j_b, i valid} log p(y_i | state before step j_b)
which is unbiased for the trajectory log-likelihood sum_i log p(y_i | state before its step) (the expectation over
j_b of S_b * f_b(j_b) is sum_j f_b(j)); tests/rl/test_estimator_remasked.py checks it against the per-step
recomputation by enumerating every draw. Full-attention models have one "block": the whole response, one global
step drawn. The draws depend on (seed, sample key, inner iteration) only, so the policy and the reference of one
sample see the same re-masked state (the ratio's schedule coefficients S_b are then the same on both sides).
"""
from __future__ import annotations

import torch

from rl.estimators.base import (
    ESTIMATORS,
    Estimate,
    EstimatorInput,
    block_alignment_option,
    padded,
    token_mask_of,
)
from rl.masking import sample_generator
from rollout.models.layout import RowPacking, alignment_origin, score_packing
from rollout.trajectory import block_local_steps

__all__ = ["RemaskDraw", "block_ids_of", "draw_remask", "remasked_step_estimator", "score_remasked"]


class RemaskDraw:
    """One sample's re-masked state: per token, the step of its block that is scored and that block's step count."""

    def __init__(self, local_steps: torch.Tensor, block_ids: torch.Tensor, chosen: torch.Tensor):
        self.local_steps = local_steps  # (L,) long: the token's step rank within its block
        self.block_ids = block_ids  # (L,) long: the token's block
        self.chosen = chosen  # (num_blocks,) long: the drawn step j_b of each block
        steps = torch.zeros(int(block_ids.max()) + 1, dtype=torch.long)
        steps.scatter_reduce_(0, block_ids, local_steps + 1, reduce="amax")
        self.steps_per_block = steps  # (num_blocks,) S_b

    @property
    def target(self) -> torch.Tensor:
        return self.chosen[self.block_ids]

    @property
    def masked(self) -> torch.Tensor:
        """(L,) bool: masked in the re-masked state (decoded at the drawn step of its block or later)."""
        return self.local_steps >= self.target

    @property
    def scored(self) -> torch.Tensor:
        """(L,) bool: the tokens newly unmasked at the drawn step."""
        return self.local_steps == self.target

    @property
    def weights(self) -> torch.Tensor:
        """(L,) float: S_b on the scored tokens of block b (the uniform draw's inverse probability), 0 elsewhere."""
        per_token = self.steps_per_block[self.block_ids].double()
        return torch.where(self.scored, per_token, torch.zeros((), dtype=torch.float64))


def block_ids_of(length: int, block_size: int | None, head: int = 0) -> torch.Tensor:
    """Block of each response token (the first block holds block_size - head tokens); None: one block."""
    positions = torch.arange(length)
    if block_size is None:
        return torch.zeros(length, dtype=torch.long)
    return (positions + head) // block_size


def draw_remask(step_map: torch.Tensor, generator: torch.Generator, *, block_size: int | None, head: int = 0
                ) -> RemaskDraw:
    """Draw j_b ~ U{0..S_b-1} for every block of one response (block_size None: one block, global steps)."""
    step_map = step_map.long().cpu()
    if block_size is None:
        local = torch.searchsorted(torch.unique(step_map), step_map)
    else:
        local = block_local_steps(step_map, block_size, head)
    blocks = block_ids_of(step_map.numel(), block_size, head)
    draw = RemaskDraw(local, blocks, torch.zeros(int(blocks.max()) + 1, dtype=torch.long))
    u = torch.rand(draw.steps_per_block.numel(), generator=generator, dtype=torch.float64)
    draw.chosen = torch.minimum((u * draw.steps_per_block).floor().long(), draw.steps_per_block - 1)
    return draw


def score_remasked(policy, inp: EstimatorInput, draws: list[RemaskDraw], *, temperature: float = 1.0,
                   return_entropy: bool = False, return_hidden: bool = False, alignment: str | None = None,
                   packing: RowPacking | None = None) -> Estimate:
    """One forward for the whole batch: every sample's re-masked state, its drawn steps' tokens scored."""
    mask_id = policy.spec.mask_token_id
    noisy = [torch.where(d.masked, torch.full_like(r, mask_id), r) for d, r in zip(draws, inp.responses, strict=True)]
    out = policy.score_responses(inp.prompts, inp.responses, noisy, score_mask=[d.scored for d in draws],
                                 temperature=temperature, return_entropy=return_entropy, return_hidden=return_hidden,
                                 alignment=alignment if policy.spec.is_block else None, **score_packing(packing))
    width = max(inp.length(b) for b in range(len(inp)))
    device = policy.device
    n = out.logprobs.shape[1]
    scored = padded([d.scored for d in draws], width, fill=False, dtype=torch.bool).to(device)
    weights = padded([d.weights.float() for d in draws], width, fill=0.0, dtype=torch.float32).to(device)
    token_logp = torch.zeros((len(inp), width), device=device)
    token_logp[:, :n] = torch.where(scored[:, :n], out.logprobs, torch.zeros_like(out.logprobs))
    valid = token_mask_of(inp, device)
    token_elbo = weights * token_logp
    entropy = hidden = None
    if return_entropy:
        entropy = torch.zeros_like(token_logp)
        entropy[:, :n] = torch.where(scored[:, :n], out.entropy, torch.zeros_like(out.entropy))
    if return_hidden:
        hidden = torch.zeros((len(inp), width, policy.hidden_size), device=device)
        hidden[:, :n] = torch.where(scored[:, :n, None], out.hidden, hidden[:, :n])
    step_ids = padded([d.local_steps for d in draws], width, fill=-1).to(device)
    return Estimate(token_logp=token_logp, seq_logp=(token_elbo * valid).sum(-1), token_mask=valid & scored,
                    forwards=1, step_ids=step_ids, entropy=entropy, hidden=hidden,
                    extra={"token_elbo": token_elbo, "remask_weights": weights})


@ESTIMATORS.register("remasked_step")
def remasked_step_estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0,
                            temperature: float = 1.0, return_entropy: bool = False, return_hidden: bool = False,
                            block_alignment: str | None = None, packing: RowPacking | None = None) -> Estimate:
    """dTRPO's one-forward trajectory estimate (module doc); needs the rollout's step maps."""
    if inp.step_maps is None:
        raise ValueError("estimator 'remasked_step' needs step maps (rollout trajectories), none were given")
    block_alignment = block_alignment_option(block_alignment)
    spec = policy.spec
    block_size = (inp.block_size or spec.block_size) if spec.is_block else None
    draws = []
    for b in range(len(inp)):
        if inp.step_maps[b].numel() != inp.length(b):
            raise ValueError(f"remasked_step estimator: sample {b} step map length {inp.step_maps[b].numel()} "
                             f"!= response length {inp.length(b)}")
        head = inp.prompts[b].numel() - alignment_origin(spec, inp.prompts[b].numel(), block_alignment) \
            if spec.is_block else 0
        gen = sample_generator(seed, inp.sample_keys[b], inner_iter, stream="remask")
        draws.append(draw_remask(inp.step_maps[b], gen, block_size=block_size, head=head))
    return score_remasked(policy, inp, draws, temperature=temperature, return_entropy=return_entropy,
                          return_hidden=return_hidden, alignment=block_alignment, packing=packing)
