"""Mask samplers: common random numbers, shapes, and unbiasedness against the exact ELBO enumeration."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rl.masking import (
    MASK_SAMPLERS,
    MaskDraw,
    block_elbo,
    block_random,
    coupled,
    draw_masks,
    exact_elbo_weights,
    mc_elbo,
    one_step,
    quadrature,
    random_mask,
    sample_generator,
    sample_seed,
    sdmc,
    trajectory_masks,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------ seeds and batches
def test_sample_seed_is_stable_and_separates_inputs():
    assert sample_seed(1, "x", 0) == 2051079291256537841  # blake2b, not Python's salted hash()
    seeds = {sample_seed(1, "x", 0), sample_seed(1, "x", 1), sample_seed(2, "x", 0), sample_seed(1, "y", 0),
             sample_seed(1, "x", 0, "prompt"), sample_seed(1, 1, 0), sample_seed(1, "1", 0), sample_seed(1, b"1", 0)}
    assert len(seeds) == 8
    assert all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize("name,opts", [("mc_elbo", {"num_samples": 3}), ("sdmc", {}), ("coupled", {}),
                                       ("random_mask", {"num_samples": 2}), ("block_elbo", {"block_size": 3}),
                                       ("block_random", {"block_size": 3, "num_samples": 2})])
def test_masks_do_not_depend_on_batch_composition(name, opts):
    keys, lengths = ["a", "b", "c"], [7, 5, 9]
    full = draw_masks(name, lengths, keys, base_seed=3, inner_iter=2, **opts)
    part = draw_masks(name, [9, 7], ["c", "a"], base_seed=3, inner_iter=2, **opts)
    for mine, other in ((full[0], part[1]), (full[2], part[0])):
        assert torch.equal(mine.masks, other.masks) and torch.equal(mine.token_weights, other.token_weights)
    again = draw_masks(name, lengths, keys, base_seed=3, inner_iter=3, **opts)
    assert any(not torch.equal(x.masks, y.masks) for x, y in zip(full, again))


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("name,opts", [("one_step", {"prompt_length": 4}), ("mc_elbo", {"num_samples": 4}),
                                       ("sdmc", {"rule": "simpson"}), ("sdmc", {"count": "bernoulli"}),
                                       ("coupled", {"num_pairs": 2}), ("random_mask", {"count": "bernoulli"}),
                                       ("block_elbo", {"block_size": 4, "count": "bernoulli"}),
                                       ("block_random", {"block_size": 4, "num_samples": 5})])
def test_draw_structure(name, opts):
    draw = MASK_SAMPLERS.get(name)(10, sample_generator(0, "k"), **opts)
    k = draw.num_forwards
    assert draw.masks.shape == draw.token_weights.shape == (k, 10) and draw.masks.dtype == torch.bool
    assert (draw.token_weights >= 0).all() and not (draw.token_weights[~draw.masks] != 0).any()
    assert torch.isfinite(draw.token_weights).all()


def test_one_step_masks_all_response_and_some_prompt():
    d = one_step(6, sample_generator(0, "p"), prompt_length=3000, p_mask=0.15)
    assert d.masks.all() and torch.equal(d.token_weights, torch.ones(1, 6))
    assert abs(d.prompt_masks.float().mean().item() - 0.15) < 0.03


def test_mc_elbo_stratifies_counts():
    d = mc_elbo(6, sample_generator(0, "s"), num_samples=6)
    assert d.masks.sum(1).tolist() == [1, 2, 3, 4, 5, 6]  # K = L: stratum k is exactly l = k + 1
    assert torch.allclose(d.token_weights.sum(1), torch.full((6,), 1.0))  # l * (L / l) / K


def test_sdmc_nodes_and_counts():
    t, w = quadrature("gauss", 3)
    assert torch.allclose(t, torch.tensor([0.1127016654, 0.5, 0.8872983346], dtype=F64))
    assert torch.allclose(w, torch.tensor([5 / 18, 8 / 18, 5 / 18], dtype=F64))
    d = sdmc(10, sample_generator(0, "q"))
    assert d.masks.sum(1).tolist() == [1, 5, 8]  # int(t L), at least 1
    assert torch.allclose(d.token_weights.max(1).values.double(), w / t, rtol=1e-6)
    s = sdmc(10, sample_generator(0, "q"), rule="simpson")
    assert s.masks.sum(1).tolist() == [1, 5, 10]
    with pytest.raises(ValueError, match="gauss nodes"):
        sdmc(10, sample_generator(0, "q"), nodes=6)


def test_coupled_views_are_complementary():
    d = coupled(12, sample_generator(0, "c"), num_pairs=3)
    assert d.num_forwards == 6
    for p in range(3):
        assert torch.equal(d.masks[2 * p], ~d.masks[2 * p + 1])
        assert 0.2 < d.t[2 * p] <= 0.8 and abs(d.t[2 * p] + d.t[2 * p + 1] - 1) < 1e-12


def test_block_samplers_respect_blocks():
    d = block_elbo(10, sample_generator(0, "b"), block_size=4, num_samples=8)
    sizes = torch.tensor([4, 4, 2])
    for k in range(8):
        per_block = torch.stack([d.masks[k, :4].sum(), d.masks[k, 4:8].sum(), d.masks[k, 8:].sum()])
        assert (per_block >= 1).all() and (per_block <= sizes).all()  # fixed count: 1..n_b per block
    r = block_random(10, sample_generator(0, "r"), block_size=4, num_samples=3)
    chosen = sorted(int(r.token_weights[k].nonzero()[0]) // 4 for k in range(3))
    assert chosen == [0, 1, 2]  # distinct blocks while K <= number of blocks
    for k in range(3):
        b = int(r.token_weights[k].nonzero()[0]) // 4
        assert r.masks[k, (b + 1) * 4:].all() and not r.masks[k, :b * 4].any()


def test_trajectory_masks():
    inputs, targets = trajectory_masks(torch.tensor([0, 0, 3, 1, 3, 7]))
    assert targets.int().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert torch.equal(inputs, targets.flip(0).cumsum(0).flip(0).bool())  # masked: this step or later
    _inputs2, targets2 = trajectory_masks(torch.tensor([0, 0, 3, 1, 3, 7]), shrink=2)
    assert targets2.int().tolist() == [[1, 1, 0, 1, 0, 0], [0, 0, 1, 0, 1, 1]]


def test_errors_name_the_problem():
    g = sample_generator(0, "e")
    with pytest.raises(ValueError, match="length"):
        mc_elbo(0, g)
    with pytest.raises(ValueError, match="t_min < t_max"):
        coupled(5, g, t_min=0.9, t_max=0.1)
    with pytest.raises(ValueError, match="unknown mask sampler 'nope'"):
        draw_masks("nope", [3], ["a"], base_seed=0)


# ------------------------------------------------------------------------------------------ exact ELBO
def test_exact_weights_match_llada_form():
    for n in range(1, 7):
        masks, w = exact_elbo_weights(n)
        assert masks.shape == (2 ** n - 1, n)
        assert torch.allclose((w[:, None] * masks).sum(0), torch.ones(n, dtype=F64))  # each token: sum 1
        # LLaDA: E_{l ~ U{1..L}} E_{|S| = l} (L / l): weight of one set of size l = (1/L) (L/l) / C(L, l).
        for row, s in enumerate(masks):
            size = int(s.sum())
            assert math.isclose(w[row].item(), 1.0 / (size * math.comb(n, size)), rel_tol=1e-12)


# A context-dependent "model": log p(y_i | S masked) = table[i, code(S)], code = bitmask of S.
def _table(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(n, 1, generator=g, dtype=F64) * 2
    return base - 2.0 * torch.rand(n, 2 ** n, generator=g, dtype=F64)  # strong dependence on the mask set


def _codes(masks: torch.Tensor) -> torch.Tensor:
    return (masks.long() << torch.arange(masks.shape[-1])).sum(-1)


def _exact_elbo(table: torch.Tensor, positions: list[int], context=lambda s: s) -> float:
    """Exact ELBO of the tokens `positions` with every other token clean, `context(S)` the set the model sees."""
    total, n = 0.0, len(positions)
    for size in range(1, n + 1):
        w = math.factorial(size - 1) * math.factorial(n - size) / math.factorial(n)
        for subset in itertools.combinations(positions, size):
            code = _codes(torch.tensor([i in context(set(subset)) for i in range(table.shape[0])]))
            total += w * sum(table[i, code].item() for i in subset)
    return total


def _estimates(draws: list[MaskDraw], table: torch.Tensor) -> torch.Tensor:
    masks = torch.stack([d.masks for d in draws])  # (N, K, L)
    weights = torch.stack([d.token_weights for d in draws]).double()
    logp = table[torch.arange(table.shape[0]), _codes(masks)[..., None]]  # (N, K, L): table[i, code_k]
    return (weights * logp).sum((1, 2))


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), x.std().item() / math.sqrt(x.numel())


def _draws(fn, n_draws: int, seed: int = 1, **opts) -> list[MaskDraw]:
    g = torch.Generator().manual_seed(seed)
    return [fn(generator=g, **opts) for _ in range(n_draws)]


UNBIASED = [  # (sampler, options, length): unbiased for the exact ELBO with any log-prob table
    (mc_elbo, {"num_samples": 1}, 5),
    (mc_elbo, {"num_samples": 3}, 5),
    (mc_elbo, {"num_samples": 2, "stratified": False}, 4),
    (sdmc, {"count": "bernoulli", "nodes": 3}, 5),  # Gauss-3 exact on polynomials of degree <= 5
    (sdmc, {"count": "bernoulli", "nodes": 2}, 4),
]


@pytest.mark.parametrize("fn,opts,n", UNBIASED)
def test_unbiased_for_exact_elbo_with_context_dependent_logprobs(fn, opts, n):
    table = _table(n)
    est = _estimates(_draws(fn, 3000, length=n, **opts), table)
    exact = _exact_elbo(table, list(range(n)))
    mean, se = _mean_se(est)
    assert abs(mean - exact) < 3 * se + 1e-9, (mean, exact, se)


def _block_exact(table: torch.Tensor, block_size: int, semi_ar: bool) -> float:
    n = table.shape[0]
    total = 0.0
    for start in range(0, n, block_size):
        block = list(range(start, min(start + block_size, n)))
        later = set(range(block[-1] + 1, n)) if semi_ar else set()
        total += _exact_elbo(table, block, context=lambda s, later=later: s | later)
    return total


@pytest.mark.parametrize("opts", [{"count": "fixed"}, {"count": "bernoulli"}, {"count": "bernoulli", "share_t": True},
                                  {"count": "fixed", "num_samples": 3}])
def test_block_elbo_unbiased_for_sum_of_block_elbos(opts):
    table = _table(5, seed=2)  # blocks {0,1}, {2,3}, {4}: each block's tokens see their own block's mask
    draws = _draws(block_elbo, 3000, length=5, block_size=2, **opts)
    block_id = torch.arange(5) // 2
    masks = torch.stack([d.masks for d in draws])
    own = masks[..., None, :] & (block_id[None, :] == block_id[:, None])  # (N, K, i, j): mask within i's block
    logp = table[torch.arange(5), _codes(own)]
    est = (torch.stack([d.token_weights for d in draws]).double() * logp).sum((1, 2))
    mean, se = _mean_se(est)
    exact = _block_exact(table, 2, semi_ar=False)
    assert abs(mean - exact) < 3 * se + 1e-9, (mean, exact, se)


def test_block_random_unbiased_for_semi_autoregressive_elbo():
    table = _table(5, seed=3)
    est = _estimates(_draws(block_random, 3000, length=5, block_size=2, num_samples=2), table)
    mean, se = _mean_se(est)
    exact = _block_exact(table, 2, semi_ar=True)
    assert abs(mean - exact) < 3 * se + 1e-9, (mean, exact, se)


def _bernoulli_band_target(table: torch.Tensor, lo: float, hi: float) -> float:
    """E_{t ~ U(lo, hi)} E_{S ~ Bern(t)} [(1/t) sum_{i in S} logp(i | S)]: a polynomial in t, integrated exactly."""
    n = table.shape[0]
    x, w = np.polynomial.legendre.leggauss(10)
    ts, ws = (hi - lo) * (x + 1) / 2 + lo, w / 2
    masks, _ = exact_elbo_weights(n)
    sums = (table[torch.arange(n), _codes(masks)[:, None]] * masks).sum(1)
    size = masks.sum(1).double()
    return sum(wi * float((ti ** (size - 1) * (1 - ti) ** (n - size) * sums).sum()) for ti, wi in zip(ts, ws))


def test_coupled_estimates_its_band_and_full_band_is_exact():
    n, table = 5, _table(5, seed=4)
    est = _estimates(_draws(coupled, 3000, length=n), table)
    mean, se = _mean_se(est)
    band = _bernoulli_band_target(table, 0.2, 0.8)  # both views: level uniform on (0.2, 0.8)
    assert abs(mean - band) < 3 * se + 1e-9, (mean, band, se)
    # The same integrand over the full band is the exact ELBO (Beta integrals): weights 1/t are right.
    assert math.isclose(_bernoulli_band_target(table, 0.0, 1.0), _exact_elbo(table, list(range(n))), rel_tol=1e-10)


def _fixed_count_target(table: torch.Tensor, count_probs: dict[int, float], weight) -> float:
    n = table.shape[0]
    total = 0.0
    for m, p in count_probs.items():
        subsets = list(itertools.combinations(range(n), m))
        for s in subsets:
            code = _codes(torch.tensor([i in s for i in range(n)]))
            total += p * weight(m) * sum(table[i, code].item() for i in s) / len(subsets)
    return total


def test_random_mask_and_sdmc_fixed_estimate_their_own_targets():
    n, table = 5, _table(5, seed=5)
    # random_mask (fixed count): m = clamp(round(t n), 1, n), t ~ U(0.1, 0.9), weight n / m.
    probs = {}
    for m in range(1, n + 1):
        lo, hi = max((m - 0.5) / n, 0.1), min((m + 0.5) / n, 0.9)
        probs[m] = max(hi - lo, 0.0) / 0.8
    target = _fixed_count_target(table, probs, lambda m: n / m)
    est = _estimates(_draws(random_mask, 3000, length=n), table)
    mean, se = _mean_se(est)
    assert abs(mean - target) < 3 * se + 1e-9
    # sdmc (fixed count, published 1/t weights): a quadrature of mask-count terms, biased for the exact ELBO.
    t, w = quadrature("gauss", 3)
    counts = [max(1, int(ti * n)) for ti in t.tolist()]
    target = sum(_fixed_count_target(table, {m: 1.0}, lambda m, wi=wi, ti=ti: wi / ti)
                 for m, wi, ti in zip(counts, w.tolist(), t.tolist()))
    est = _estimates(_draws(sdmc, 3000, length=n), table)
    mean, se = _mean_se(est)
    assert abs(mean - target) < 3 * se + 1e-9
    assert abs(mean - _exact_elbo(table, list(range(n)))) > 3 * se  # the test has power: this bias is detected


@pytest.mark.parametrize("fn,opts", [(mc_elbo, {"num_samples": 2}), (sdmc, {"weighting": "count"}),
                                     (sdmc, {"count": "bernoulli", "nodes": 5}), (coupled, {}),
                                     (random_mask, {"num_samples": 2}), (random_mask, {"count": "bernoulli"}),
                                     (block_elbo, {"block_size": 3}), (block_elbo, {"block_size": 3, "count": "bernoulli"}),
                                     (block_random, {"block_size": 3, "num_samples": 2}), (one_step, {})])
def test_unbiased_when_logprobs_do_not_depend_on_the_mask(fn, opts):
    n = 11
    logp = -torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=F64) * 3
    draws = _draws(fn, 3000, length=n, **opts)
    est = torch.stack([d.estimate(logp.expand(d.num_forwards, n)) for d in draws])
    mean, se = _mean_se(est)
    assert abs(mean - logp.sum().item()) < 3 * se + 1e-6, (mean, logp.sum().item(), se)


def test_sdmc_weights_total():
    for rule, nodes in (("gauss", 1), ("gauss", 3), ("gauss", 5), ("simpson", 3)):
        d = sdmc(13, sample_generator(0, "x"), rule=rule, nodes=nodes, weighting="count")
        assert math.isclose(d.token_weights.sum().item(), 13, rel_tol=1e-6)  # a constant log-prob is exact
        t, w = quadrature(rule, nodes)
        d = sdmc(13, sample_generator(0, "x"), rule=rule, nodes=nodes)  # published 1/t: int(t L) / (t L) off
        expected = sum(wi / ti * max(1, int(ti * 13)) for ti, wi in zip(t.tolist(), w.tolist()))
        assert math.isclose(d.token_weights.sum().item(), expected, rel_tol=1e-6)
