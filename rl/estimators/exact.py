"""Exact masked-diffusion ELBOs by enumerating every mask: the ground truth for estimator tests (L <= ~8).

ELBO = sum over non-empty mask sets S of (|S|-1)! (L-|S|)! / L! * sum_{i in S} log p(y_i | q, y with S masked),
which is LLaDA's E_l E_{|S|=l} (L/l) sum log p and the integral over t of the linear-schedule MDLM bound.
For block models the ELBO is the sum over blocks of each block's ELBO given the prompt and the clean earlier blocks.
`exact_expectation` gives the exact mean of any estimator that draws one mask set of size m with weight c, so an
estimator's own bias (e.g. SDMC's quadrature) can be told apart from its noise.
"""
from __future__ import annotations

import itertools
from math import factorial

import torch


def subset_weight(size: int, length: int) -> float:
    return factorial(size - 1) * factorial(length - size) / factorial(length)


def all_masks(length: int) -> list[tuple[int, ...]]:
    return [s for k in range(1, length + 1) for s in itertools.combinations(range(length), k)]


def masked_logps(policy, prompt: torch.Tensor, response: torch.Tensor, positions: range,
                 chunk: int = 64) -> dict[tuple[int, ...], torch.Tensor]:
    """For every non-empty subset S of `positions`: log p(y_i | y with S masked) for i in S (a tensor in S order)."""
    subsets = [tuple(positions[i] for i in s) for s in all_masks(len(positions))]
    out = {}
    for start in range(0, len(subsets), chunk):
        batch = subsets[start:start + chunk]
        noisy, score = [], []
        for s in batch:
            state = response.clone()
            state[list(s)] = policy.spec.mask_token_id
            flags = torch.zeros(response.numel(), dtype=torch.bool)
            flags[list(s)] = True
            noisy.append(state)
            score.append(flags)
        with torch.no_grad():
            scores = policy.score_responses([prompt] * len(batch), [response] * len(batch), noisy, score_mask=score)
        for row, s in enumerate(batch):
            out[s] = scores.logprobs[row, list(s)].double().cpu()
    return out


def _segment_elbo(table: dict[tuple[int, ...], torch.Tensor], length: int) -> float:
    return sum(subset_weight(len(s), length) * float(v.sum()) for s, v in table.items())


def exact_elbo(policy, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """Exact ELBO of the whole response (full-attention) or the sum of exact block ELBOs (block models)."""
    length = response.numel()
    if not policy.spec.is_block:
        return _segment_elbo(masked_logps(policy, prompt, response, range(length)), length)
    # The layout's blocks (rollout/models/masks.py): under `absolute` alignment the first one also holds the
    # prompt's tail, so it has only size - head response tokens.
    total, size = 0.0, policy.spec.block_size
    head = prompt.numel() - policy.spec.block_origin(prompt.numel())
    for start in range(-head, length, size):
        block = range(max(start, 0), min(start + size, length))
        total += _segment_elbo(masked_logps(policy, prompt, response, block), len(block))
    return total


def exact_expectation(table: dict[tuple[int, ...], torch.Tensor], length: int,
                      draws: list[tuple[int, float, float]]) -> float:
    """Exact mean of sum_n p_n * c_n * sum_{i in S_n} log p_i where S_n is uniform over sets of size m_n.

    `draws` lists (m_n, c_n, p_n): mask size, weight, and probability/quadrature weight of that draw.
    """
    by_size: dict[int, list[float]] = {}
    for s, v in table.items():
        by_size.setdefault(len(s), []).append(float(v.sum()))
    return sum(p * c * sum(by_size[m]) / len(by_size[m]) for m, c, p in draws)
