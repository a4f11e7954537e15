"""Trajectory likelihood (TraceRL, CJ-GRPO): log p of each token at the step it was actually decoded.

The state before a step is the response with every token decoded at that step or later masked. `shrink` s merges
s consecutive steps: their tokens are all scored from the state before the first of them.

Block models: step j of every block is scored in the same forward pass, because in the training layout each noisy
block sees only the prompt, the clean earlier blocks and itself, exactly the context it had while being decoded.
A response therefore costs ceil(steps_per_block / s) forwards, however many blocks it has; the j used is the
rank of the token's step among its block's distinct steps (`Trajectory.block_local_steps`), so dynamic decoding
that takes fewer steps in some blocks needs no special case.

Shared clean part (block models, `shared_clean=True`, the default): the passes differ only in their noisy canvas,
while the prompt and clean response are the same in each, and clean states never see noisy keys. So the G passes
are one forward over `[prompt | clean | noisy canvas 1 | ... | noisy canvas G]` (layout.copies_layout), each
copy seeing the clean part as before and noisy keys only of its own block in its own copy: the same scores and the
same gradient as G forwards, with the clean part computed once (`forwards` = 1). A sample gets a copy only for the
groups it has. `shared_clean=False` keeps one forward per group.

Full-attention models: the state before global step s masks the whole rest of the canvas, so each group of s
global steps is one forward; samples are batched per group.

Block alignment (rollout/models/masks.py): by default the training layout uses the model's own alignment, the one
the rollout decoded with, so every recorded log-prob is recomputed exactly (for an `absolute` model the first block
holds the prompt's tail). `block_alignment="response"` reproduces TraceRL's released training code instead, which
cuts the response into blocks from its first token whatever the model decoded with (a train/inference mismatch for
SDAR/TraDo whenever the prompt length is not a multiple of the block size).
"""
from __future__ import annotations

import torch

from rl.estimators.base import ESTIMATORS, Estimate, EstimatorInput, block_alignment_option, padded, token_mask_of
from rollout.models.layout import RowPacking, alignment_origin, layout_length, score_packing
from rollout.trajectory import block_local_steps


def step_groups(inp: EstimatorInput, block_model: bool, block_size: int, shrink: int,
                heads: list[int] | None = None) -> list[torch.Tensor]:
    """Per sample, the forward-pass group of each token: tokens of group g are scored in pass g. `heads`: per
    sample, the prompt tokens in the first training block (`absolute` alignment; default none)."""
    if inp.step_maps is None:
        raise ValueError("estimator 'trajectory' needs step maps (rollout trajectories), none were given")
    groups = []
    for b, step_map in enumerate(inp.step_maps):
        step_map = step_map.long().cpu()
        if step_map.numel() != inp.length(b):
            raise ValueError(f"trajectory estimator: sample {b} step map length {step_map.numel()} "
                             f"!= response length {inp.length(b)}")
        head = heads[b] if heads is not None else 0
        steps = block_local_steps(step_map, block_size, head) if block_model else step_map - step_map.min()
        groups.append(steps // shrink)
    return groups


def group_state(response: torch.Tensor, group: torch.Tensor, g: int, mask_id: int) -> torch.Tensor:
    """The state before pass g: every token of group g or later masked."""
    state = response.clone()
    state[group >= g] = mask_id
    return state


def group_states(inp: EstimatorInput, groups: list[torch.Tensor], mask_id: int
                 ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per sample, the states of the passes it has (groups with at least one token), and per state the tokens it
    scores: what the per-pass loop would feed sample b in those passes."""
    states, scored = [], []
    for response, group in zip(inp.responses, groups):
        present = torch.unique(group).tolist()
        states.append([group_state(response, group, g, mask_id) for g in present])
        scored.append([group == g for g in present])
    return states, scored


def sample_groups(spec, inp: EstimatorInput, shrink: int, block_alignment: str | None
                  ) -> tuple[list[torch.Tensor], str | None]:
    """Per sample, the pass group of each token (`step_groups` under the model's or the asked block alignment),
    and that alignment."""
    if shrink < 1:
        raise ValueError(f"estimator.shrink: must be >= 1, got {shrink}")
    block_alignment = block_alignment_option(block_alignment)
    heads = None
    if spec.is_block:
        heads = [p.numel() - alignment_origin(spec, p.numel(), block_alignment) for p in inp.prompts]
    return step_groups(inp, spec.is_block, inp.block_size or spec.block_size, shrink, heads), block_alignment


def layout_tokens(spec, inp: EstimatorInput, *, shrink: int = 1, shared_clean: bool = True,
                  block_alignment: str | None = None) -> list[int]:
    """Per sample, the positions of the layout a scoring forward lays it in (the learner's token budget,
    `learner.pack_tokens`): one noisy canvas per step group the sample has under the one-forward path, one
    canvas per forward otherwise."""
    groups, alignment = sample_groups(spec, inp, shrink, block_alignment)
    one_forward = spec.is_block and shared_clean
    return [layout_length(spec, inp.prompts[b].numel(), inp.length(b), alignment,
                          copies=int(torch.unique(groups[b]).numel()) if one_forward else 1)
            for b in range(len(inp))]


@ESTIMATORS.register("trajectory", shrink=1, shared_clean=True)
def trajectory_estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0, shrink: int = 1,
                         temperature: float = 1.0, return_entropy: bool = False,
                         return_hidden: bool = False, block_alignment: str | None = None,
                         packing: RowPacking | None = None, shared_clean: bool = True) -> Estimate:
    del seed, inner_iter  # deterministic: the masks are the recorded trajectory itself
    spec = policy.spec
    groups, block_alignment = sample_groups(spec, inp, shrink, block_alignment)
    width = max(inp.length(b) for b in range(len(inp)))
    device = policy.device
    token_logp = torch.zeros((len(inp), width), device=device)
    entropy = torch.zeros_like(token_logp) if return_entropy else None
    hidden = torch.zeros((len(inp), width, policy.hidden_size), device=device) if return_hidden else None
    mask = token_mask_of(inp, device)
    step_ids = padded([g.to(torch.long) for g in groups], width, fill=-1).to(device)
    if spec.is_block and shared_clean:
        out = policy.score_trajectory_copies(
            inp.prompts, inp.responses, *group_states(inp, groups, spec.mask_token_id),
            temperature=temperature, return_entropy=return_entropy, return_hidden=return_hidden,
            alignment=block_alignment, **score_packing(packing),
        )
        n = out.logprobs.shape[1]
        token_logp[:, :n] = out.logprobs
        if return_entropy:
            entropy[:, :n] = out.entropy
        if return_hidden:
            hidden[:, :n] = out.hidden
        return Estimate(
            token_logp=token_logp, seq_logp=(token_logp * mask).sum(-1), token_mask=mask, forwards=1,
            step_ids=step_ids, entropy=entropy, hidden=hidden, extra={"token_elbo": token_logp},
        )
    num_groups = max(int(g.max()) + 1 for g in groups)
    forwards = 0
    for g in range(num_groups):
        members = [b for b in range(len(inp)) if bool((groups[b] == g).any())]
        noisy, score = [], []
        for b in members:
            noisy.append(group_state(inp.responses[b], groups[b], g, spec.mask_token_id))
            score.append(groups[b] == g)
        out = policy.score_responses(
            [inp.prompts[b] for b in members], [inp.responses[b] for b in members], noisy,
            score_mask=score, temperature=temperature, return_entropy=return_entropy, return_hidden=return_hidden,
            alignment=block_alignment if spec.is_block else None, **score_packing(packing),
        )
        forwards += 1
        rows = torch.tensor(members, device=device)
        n = out.logprobs.shape[1]
        # Each token is scored in exactly one pass, so adding the passes assembles the full map.
        token_logp[rows, :n] = token_logp[rows, :n] + out.logprobs
        if return_entropy:
            entropy[rows, :n] = entropy[rows, :n] + out.entropy
        if return_hidden:
            sel = out.valid[:, :, None]
            hidden[rows, :n] = torch.where(sel, out.hidden, hidden[rows, :n])
    return Estimate(
        token_logp=token_logp, seq_logp=(token_logp * mask).sum(-1), token_mask=mask, forwards=forwards,
        step_ids=step_ids, entropy=entropy, hidden=hidden, extra={"token_elbo": token_logp},
    )


# The learner plans its token-budget micro-batches with this (rl.estimators.base.layout_tokens).
trajectory_estimator.layout_tokens = layout_tokens
