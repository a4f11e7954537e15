"""Mask samplers for the likelihood estimators of masked diffusion models (pure functions, CPU, no model).

Every sampler draws the masks of ONE sample from a `torch.Generator` the caller built for that sample
(`sample_generator(base_seed, sample_key, inner_iter)`), so a sample's masks never depend on the batch it sits
in: the old, reference and current log-likelihoods of a sample see the same masks (common random numbers).

A draw is a `MaskDraw`: K masked copies of the response (`masks`, True = replaced by the mask token) and
`token_weights`, the weight of each token's log-prob in the estimate, zero for tokens not counted, such that

    ELBO(y) ~= sum_k sum_i token_weights[k, i] * log p(y_i | q, y with masks[k] masked)      (`MaskDraw.estimate`)

Reference ELBO (ALGORITHMS.md): sum over nonempty S of (|S|-1)!(L-|S|)!/L! * sum_{i in S} log p(y_i | y_S masked)
(`exact_elbo_weights`). Samplers are called with the number of positions that take part (normally the valid
length); what the estimator does with positions beyond it is the model adapter's convention.
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rl.registry import Registry

MASK_SAMPLERS = Registry("mask sampler")

_F64 = torch.float64


def sample_seed(base_seed: int, sample_key: str | int | bytes, inner_iter: int = 0, stream: str = "") -> int:
    """A stable 63-bit seed for one sample: blake2b of (base_seed, key, inner_iter, stream), never Python's hash().

    `sample_key` should identify the response (e.g. `Trajectory.request_id`); `stream` separates independent
    uses (e.g. "prompt" vs "response") of one sample at one inner iteration.
    """
    key = sample_key if isinstance(sample_key, bytes) else str(sample_key).encode()
    kind = b"b" if isinstance(sample_key, bytes) else (b"i" if isinstance(sample_key, int) else b"s")
    payload = repr((int(base_seed), kind + key, int(inner_iter), str(stream))).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def sample_generator(base_seed: int, sample_key: str | int | bytes, inner_iter: int = 0,
                     stream: str = "") -> torch.Generator:
    """A fresh CPU generator seeded with `sample_seed(...)`."""
    return torch.Generator().manual_seed(sample_seed(base_seed, sample_key, inner_iter, stream))


@dataclass(frozen=True)
class MaskDraw:
    masks: torch.Tensor  # (K, L) bool: position replaced by the mask token in forward k
    token_weights: torch.Tensor  # (K, L) float32: weight of that token's log-prob in the estimate; 0 = not counted
    t: torch.Tensor  # (K,) mask level of each forward (fraction or time); (K, num_blocks) for block samplers
    prompt_masks: torch.Tensor | None = None  # (K, P) bool: prompt positions masked too (one_step only)

    @property
    def num_forwards(self) -> int:
        return int(self.masks.shape[0])

    def estimate(self, logp: torch.Tensor) -> torch.Tensor:
        """ELBO estimate from per-forward token log-probs `logp` (..., K, L) -> (...)."""
        w = self.token_weights.to(device=logp.device, dtype=logp.dtype)
        return (w * torch.where(w != 0, logp, torch.zeros_like(logp))).sum(dim=(-2, -1))


def _check_length(length: int) -> int:
    if int(length) < 1:
        raise ValueError(f"mask sampler: length {length} < 1")
    return int(length)


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=_F64)


def _exact_count_masks(counts: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """(K,) counts -> (K, L) masks with exactly counts[k] positions, uniformly without replacement."""
    ranks = _rand((counts.numel(), length), generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def _weights_on(masks: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    return torch.where(masks, per_token, torch.zeros((), dtype=per_token.dtype)).float()


@MASK_SAMPLERS.register("one_step")
def one_step(length: int, generator: torch.Generator, *, prompt_length: int = 0, p_mask: float = 0.15) -> MaskDraw:
    """d1: every response token masked (weight 1: the estimate is the sum of one-step token log-probs, not an ELBO),
    and each prompt token masked with probability `p_mask`."""
    length = _check_length(length)
    masks = torch.ones(1, length, dtype=torch.bool)
    prompt_masks = _rand((1, int(prompt_length)), generator) < p_mask
    return MaskDraw(masks, torch.ones(1, length), torch.ones(1, dtype=_F64), prompt_masks)


@MASK_SAMPLERS.register("mc_elbo")
def mc_elbo(length: int, generator: torch.Generator, *, num_samples: int = 1, stratified: bool = True,
            form: str = "count") -> MaskDraw:
    """The masked-diffusion ELBO by Monte Carlo, K = num_samples forwards, in one of its two unbiased forms.

    form="count" (LLaDA's likelihood evaluation): forward k masks exactly l_k of L tokens, weight (L / l_k) / K;
    l_k = floor(u_k L) + 1, so l is uniform on 1..L.
    form="time" (the ELBO as LLaDA 1.5 / VRPO write it, B = E_{t~U[0,1]} E_{y_t~q(.|t,y)} (1/t) sum_i 1[y_t^i = M]
    log p(y^i | y_t)): forward k draws t_k = 1 - u_k in (0, 1] and masks each token independently with
    probability t_k, weight 1 / (t_k K) (a forward that masks nothing scores nothing).
    `stratified`: u_k = (k + U_k) / K across the K forwards (one stratum each); false: u_k i.i.d. uniform."""
    length = _check_length(length)
    u = _rand((num_samples,), generator)
    if stratified:
        u = (torch.arange(num_samples, dtype=_F64) + u) / num_samples
    if form == "time":
        t = 1.0 - u  # (0, 1]: 1/t stays finite
        masks = _rand((num_samples, length), generator) < t[:, None]
        per_token = (1.0 / (t * num_samples))[:, None].expand(-1, length)
        return MaskDraw(masks, _weights_on(masks, per_token), t)
    if form != "count":
        raise ValueError(f"mc_elbo: unknown form '{form}' (count | time)")
    counts = (u * length).floor().long().clamp(max=length - 1) + 1
    masks = _exact_count_masks(counts, length, generator)
    per_token = (length / (counts.to(_F64) * num_samples))[:, None].expand(-1, length)
    return MaskDraw(masks, _weights_on(masks, per_token), counts.to(_F64) / length)


def quadrature(rule: str, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t_n in (0, 1] and weights (summing to 1) of the SDMC rule: Gauss-Legendre t_n = (x_n + 1)/2, w_n/2;
    "simpson": t = (0.1, 0.5, 1.0), w = (1/6, 4/6, 1/6) (the t = 0 node moved to 0.1, as GDPO does)."""
    t, w = _quadrature(rule, nodes)
    return torch.tensor(t, dtype=_F64), torch.tensor(w, dtype=_F64)


@functools.cache
def _quadrature(rule: str, nodes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if rule == "gauss":
        if not 1 <= nodes <= 5:
            raise ValueError(f"sdmc: gauss nodes {nodes} outside 1..5")
        x, w = np.polynomial.legendre.leggauss(nodes)
        return tuple(((x + 1) / 2).tolist()), tuple((w / 2).tolist())
    if rule == "simpson":
        return (0.1, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6)
    raise ValueError(f"sdmc: unknown rule '{rule}' (gauss | simpson)")


@MASK_SAMPLERS.register("sdmc")
def sdmc(length: int, generator: torch.Generator, *, rule: str = "gauss", nodes: int = 3, count: str = "fixed",
         weighting: str = "time", repeats: int = 1) -> MaskDraw:
    """GDPO semi-deterministic MC: one forward per quadrature node (times `repeats`).

    count="fixed" (GDPO): max(1, int(t_n L)) tokens masked uniformly without replacement; token weight
      (w_n / repeats) / t_n with weighting="time" (published), or (w_n / repeats) * L / m_n with weighting="count"
      (then the weights sum to L and the estimate is unbiased whenever token log-probs do not depend on the mask;
      with 1/t_n it is off by the factor int(t_n L) / (t_n L)).
    count="bernoulli": each token masked with probability t_n, weight (w_n / repeats) / t_n. The Bernoulli
      integrand is a polynomial of degree L-1 in t, so gauss-n is then unbiased for the exact ELBO when L <= 2n.
    """
    length = _check_length(length)
    t, w = quadrature(rule, nodes)
    t, w = t.repeat_interleave(repeats), w.repeat_interleave(repeats) / repeats
    if count == "fixed":
        counts = (t * length).floor().long().clamp(min=1, max=length)
        masks = _exact_count_masks(counts, length, generator)
        if weighting == "time":
            per_mask = w / t
        elif weighting == "count":
            per_mask = w * length / counts.to(_F64)
        else:
            raise ValueError(f"sdmc: unknown weighting '{weighting}' (time | count)")
    elif count == "bernoulli":
        masks = _rand((t.numel(), length), generator) < t[:, None]
        per_mask = w / t
    else:
        raise ValueError(f"sdmc: unknown count '{count}' (fixed | bernoulli)")
    return MaskDraw(masks, _weights_on(masks, per_mask[:, None].expand(-1, length)), t)


@MASK_SAMPLERS.register("coupled")
def coupled(length: int, generator: torch.Generator, *, num_pairs: int = 1, t_min: float = 0.2,
            t_max: float = 0.8) -> MaskDraw:
    """DiffuCoder coupled sampling: t ~ U(t_min, t_max), u ~ U(0,1)^L; forward 2p masks {u < t} (weight 1/t),
    forward 2p+1 its complement (weight 1/(1-t)), both halved and divided by `num_pairs`; every token is masked in
    exactly one view of a pair. Unbiased for the exact ELBO only with (t_min, t_max) = (0, 1); the published
    (0.2, 0.8) estimates the ELBO restricted to that band (exact when log-probs do not depend on the mask).
    DiffuCoder's per-token mix with a fully masked forward is the estimator's business."""
    length = _check_length(length)
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"coupled: need 0 <= t_min < t_max <= 1, got ({t_min}, {t_max})")
    t = t_max - (t_max - t_min) * _rand((num_pairs,), generator)  # in (t_min, t_max]
    first = _rand((num_pairs, length), generator) < t[:, None]
    masks = torch.stack([first, ~first], dim=1).reshape(2 * num_pairs, length)
    levels = torch.stack([t, 1 - t], dim=1).reshape(-1)
    per_token = (1.0 / (2 * num_pairs * levels))[:, None].expand(-1, length)
    return MaskDraw(masks, _weights_on(masks, per_token), levels)


@MASK_SAMPLERS.register("random_mask")
def random_mask(length: int, generator: torch.Generator, *, num_samples: int = 1, t_min: float = 0.1,
                t_max: float = 0.9, count: str = "fixed") -> MaskDraw:
    """UniGRPO / dLLM-RL random masking: ratio t_k ~ U[t_min, t_max] per forward. count="fixed": m_k =
    clamp(round(t_k L), 1, L) tokens masked, weight (L / m_k) / K; count="bernoulli": each token w.p. t_k,
    weight 1 / (t_k K). Exact ELBO only when log-probs do not depend on the mask."""
    length = _check_length(length)
    t = t_min + (t_max - t_min) * _rand((num_samples,), generator)
    if count == "fixed":
        counts = (t * length).round().long().clamp(min=1, max=length)
        masks = _exact_count_masks(counts, length, generator)
        per_mask = length / (counts.to(_F64) * num_samples)
    elif count == "bernoulli":
        masks = _rand((num_samples, length), generator) < t[:, None]
        per_mask = 1.0 / (t * num_samples)
    else:
        raise ValueError(f"random_mask: unknown count '{count}' (fixed | bernoulli)")
    return MaskDraw(masks, _weights_on(masks, per_mask[:, None].expand(-1, length)), t)


def _blocks(length: int, block_size: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Block id of each response position and each block's size. `offset` response positions are missing from
    the first block (under `absolute` alignment the prompt's tail fills them, see rollout/models/masks.py)."""
    if int(block_size) < 1:
        raise ValueError(f"block sampler: block_size {block_size} < 1")
    if not 0 <= int(offset) < int(block_size):
        raise ValueError(f"block sampler: offset {offset} outside [0, block_size {block_size})")
    block_id = (torch.arange(length) + int(offset)) // int(block_size)
    return block_id, torch.bincount(block_id)


def _local_ranks(block_id: torch.Tensor, num_draws: int, generator: torch.Generator) -> torch.Tensor:
    """(K, L) rank of each position among its block's positions, in a uniformly random order per draw."""
    key = block_id.to(_F64)[None, :] + _rand((num_draws, block_id.numel()), generator)  # block-major sort key
    global_rank = key.argsort(dim=1).argsort(dim=1)
    starts = torch.searchsorted(block_id, block_id)  # first position of each position's block
    return global_rank - starts[None, :]


@MASK_SAMPLERS.register("block_elbo")
def block_elbo(length: int, generator: torch.Generator, *, block_size: int, num_samples: int = 1,
               count: str = "fixed", share_t: bool = False, stratified: bool = True, offset: int = 0) -> MaskDraw:
    """Block diffusion (BD3-LM / SDAR training): every block masked independently, its own level per block
    (one level for all blocks with share_t); the estimate is the sum over blocks of each block's ELBO given the
    clean earlier blocks (the `[noisy | clean]` training pass). Levels u ~ U[0, 1) stratified across the K
    forwards, with an independent stratum order per block.
    count="fixed": l_b = floor(u n_b) + 1 of the block's n_b tokens masked, weight (n_b / l_b) / K.
    count="bernoulli": tokens masked w.p. u; weight (n_b + 1) / (c_b K) with c_b the block's masked count (the
      count is uniform on 0..n_b when u is uniform, so this is unbiased with finite variance, unlike 1/u).
    offset: response positions missing from the first block (the layout's blocks; see `_blocks`)."""
    length = _check_length(length)
    block_id, sizes = _blocks(length, block_size, offset)
    nb, k = sizes.numel(), num_samples
    cols = 1 if share_t else nb
    u = _rand((k, cols), generator)
    if stratified:
        strata = _rand((k, cols), generator).argsort(dim=0)  # a random permutation of 0..K-1 per column
        u = (strata.to(_F64) + u) / k
    u = u.expand(k, nb)
    size_f = sizes.to(_F64)[None, :]
    if count == "fixed":
        counts = (u * size_f).floor().long().clamp(max=sizes[None, :] - 1) + 1  # (K, nb)
        masks = _local_ranks(block_id, k, generator) < counts[:, block_id]
        per_block = size_f / (counts.to(_F64) * k)
        levels = counts.to(_F64) / size_f
    elif count == "bernoulli":
        masks = _rand((k, length), generator) < u[:, block_id]
        counts = torch.zeros(k, nb, dtype=_F64).index_add_(1, block_id, masks.to(_F64))
        per_block = (size_f + 1) / (counts.clamp(min=1) * k)
        levels = u.clone()
    else:
        raise ValueError(f"block_elbo: unknown count '{count}' (fixed | bernoulli)")
    return MaskDraw(masks, _weights_on(masks, per_block[:, block_id]), levels)


@MASK_SAMPLERS.register("block_random")
def block_random(length: int, generator: torch.Generator, *, block_size: int, num_samples: int = 1,
                 prompt_length: int = 0, p_mask: float = 0.0, offset: int = 0, weighting: str = "block",
                 valid_length: int | None = None) -> MaskDraw:
    """SPG-style semi-autoregressive block masking: forward k picks a block b_k, masks l ~ U{1..n_b} of its
    tokens, masks every later block completely and keeps earlier blocks clean. Each prompt token is masked with
    probability `p_mask` in each forward (SPG's use_mask_prompt, p 0.15), drawn after the response masks.
    offset: response positions missing from the first block (the layout's blocks; see `_blocks`).
    weighting="block": b_k among all blocks (distinct while K <= number of blocks); only block b_k's masked tokens
      count, weight (nb / K) * n_b / l: unbiased for the sum over blocks of each block's ELBO given clean earlier
      blocks and fully masked later ones.
    weighting="released" (facebookresearch/SPG spg_trainer.py, forward_type block_random): with v = valid_length
      (the tokens through the first EOS), b_k = randperm(nb)[k] mod (number of blocks holding valid tokens), l ~
      U{1..n'} over the block's n' valid tokens, every token after the first EOS masked too; EVERY masked valid
      token counts (later blocks included) with weight v / (K m_k), m_k the masked valid tokens of forward k, so
      that sum_kj w lp / v = mean_k (mean log-prob of forward k's masked valid tokens), SPG's ELBO, and
      1 / (K t_k) with t_k = m_k / v is its EUBO weight."""
    length = _check_length(length)
    block_id, sizes = _blocks(length, block_size, offset)
    nb, k = sizes.numel(), num_samples
    if weighting == "released":
        return _block_random_released(length, generator, block_id, sizes, k, prompt_length, p_mask,
                                      length if valid_length is None else int(valid_length))
    if weighting != "block":
        raise ValueError(f"block_random: unknown weighting '{weighting}' (block | released)")
    if k <= nb:
        chosen = torch.randperm(nb, generator=generator)[:k]
    else:
        chosen = torch.randint(nb, (k,), generator=generator)
    n_b = sizes[chosen]
    counts = (_rand((k,), generator) * n_b).floor().long().clamp(max=n_b - 1) + 1
    in_block = block_id[None, :] == chosen[:, None]
    picked = _local_ranks(block_id, k, generator) < counts[:, None]
    masks = (in_block & picked) | (block_id[None, :] > chosen[:, None])
    per_mask = nb * n_b.to(_F64) / (counts.to(_F64) * k)
    weights = _weights_on(in_block & picked, per_mask[:, None].expand(-1, length))
    prompt_masks = _rand((k, int(prompt_length)), generator) < p_mask if p_mask > 0 else None
    return MaskDraw(masks, weights, counts.to(_F64) / n_b, prompt_masks)


def _block_random_released(length: int, generator: torch.Generator, block_id: torch.Tensor, sizes: torch.Tensor,
                           k: int, prompt_length: int, p_mask: float, valid: int) -> MaskDraw:
    """block_random(weighting="released"): see there."""
    if not 1 <= valid <= length:
        raise ValueError(f"block_random: valid_length {valid} outside [1, {length}]")
    nb = sizes.numel()
    is_valid = torch.arange(length) < valid
    valid_blocks = int(block_id[valid - 1]) + 1
    order = torch.randperm(nb, generator=generator)
    chosen = (order[:k] if k <= nb else torch.randint(nb, (k,), generator=generator)) % valid_blocks
    n_valid = torch.bincount(block_id[is_valid], minlength=nb)[chosen]  # valid tokens of each chosen block
    counts = (_rand((k,), generator) * n_valid).floor().long().clamp(max=n_valid - 1) + 1
    in_block = (block_id[None, :] == chosen[:, None]) & is_valid[None, :]
    picked = _local_ranks(torch.where(is_valid, block_id, block_id.new_full((), nb)), k, generator) < counts[:, None]
    masks = (in_block & picked) | (block_id[None, :] > chosen[:, None]) | ~is_valid[None, :]
    counted = masks & is_valid[None, :]
    per_forward = valid / (counted.sum(1).to(_F64) * k)
    weights = _weights_on(counted, per_forward[:, None].expand(-1, length))
    prompt_masks = _rand((k, int(prompt_length)), generator) < p_mask if p_mask > 0 else None
    return MaskDraw(masks, weights, counted.sum(1).to(_F64) / valid, prompt_masks)


def trajectory_masks(steps: torch.Tensor, *, shrink: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """TraceRL / CJ-GRPO passes from a (L,) step index (a trajectory's step_map, or `block_local_steps()` for
    block models): steps are ranked among their distinct values, `shrink` consecutive ranks merged; pass s masks
    the tokens with merged step >= s (`inputs`, (S, L)) and trains those == s (`targets`, (S, L))."""
    if steps.dim() != 1 or steps.numel() == 0:
        raise ValueError(f"trajectory_masks: steps must be a non-empty 1-D tensor, got shape {tuple(steps.shape)}")
    if shrink < 1:
        raise ValueError(f"trajectory_masks: shrink {shrink} < 1")
    rank = torch.searchsorted(torch.unique(steps), steps) // shrink
    passes = torch.arange(int(rank.max()) + 1, device=steps.device)[:, None]
    return rank[None, :] >= passes, rank[None, :] == passes


def exact_elbo_weights(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 2^L - 1 nonempty mask sets (row r = bits of r + 1) and their ELBO weights (|S|-1)!(L-|S|)!/L! (float64).
    Each token lies in sets whose weights sum to 1, so the ELBO of mask-independent log-probs is their sum."""
    length = _check_length(length)
    if length > 20:
        raise ValueError(f"exact_elbo_weights: length {length} > 20 (2^L sets)")
    codes = torch.arange(1, 2 ** length)
    masks = ((codes[:, None] >> torch.arange(length)) & 1).bool()
    by_size = torch.tensor([0.0] + [math.factorial(s - 1) * math.factorial(length - s) / math.factorial(length)
                                    for s in range(1, length + 1)], dtype=_F64)
    return masks, by_size[masks.sum(dim=1)]


def draw_masks(name: str, lengths: Sequence[int], keys: Sequence[str | int | bytes], *, base_seed: int,
               inner_iter: int = 0, stream: str = "", sample_options: Sequence[dict] | None = None,
               **options: Any) -> list[MaskDraw]:
    """Sampler `name` applied to each sample with its own generator: sample i's draw depends only on
    (base_seed, keys[i], inner_iter, stream, lengths[i], options, sample_options[i]), never on the batch.
    `sample_options` adds per-sample arguments (a prompt length, a block offset)."""
    if len(lengths) != len(keys):
        raise ValueError(f"draw_masks: {len(lengths)} lengths but {len(keys)} keys")
    if sample_options is not None and len(sample_options) != len(keys):
        raise ValueError(f"draw_masks: {len(sample_options)} sample_options but {len(keys)} keys")
    sampler = MASK_SAMPLERS.get(name)
    extra = sample_options if sample_options is not None else [{}] * len(keys)
    return [sampler(n, sample_generator(base_seed, key, inner_iter, stream), **options, **more)
            for n, key, more in zip(lengths, keys, extra)]
