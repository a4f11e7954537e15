"""Mask-sampling estimators against exact enumeration on a tiny model, and common random numbers.

A random-init model predicts almost uniformly whatever is masked, which would let any estimator whose weights sum
correctly pass. The fixture sharpens the model (scaled weights) and checks that log-probs really depend on the
mask set before any comparison is made.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.estimators.exact import exact_elbo, exact_expectation, masked_logps, subset_weight
from rl.masking import quadrature
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy

N_DRAWS = 400  # independent estimates per comparison (distinct sample keys)


def _sharpen(policy, factor):
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "norm" not in name:
                p.mul_(factor)
    return policy


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharp")
    out = {}
    for name, kind, block, alignment in (("llada", "llada", None, None), ("block", "block", 3, None),
                                         ("block_absolute", "block", 3, "absolute")):
        path = make_tiny_policy(kind, root / name, seed=5, hidden_size=32, num_layers=2, num_heads=2,
                                num_kv_heads=1, intermediate_size=64, block_size=block, block_alignment=alignment)
        out[name] = _sharpen(load_policy(path), 6.0)
    return out


def _case(policy, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, 60, (4,), generator=g)
    response = torch.randint(10, 60, (length,), generator=g)
    return prompt, response


def _many(prompt, response, n=N_DRAWS):
    return EstimatorInput([prompt] * n, [response] * n, [f"draw{i}" for i in range(n)])


def _mean_se(values):
    values = values.double()
    return float(values.mean()), float(values.std() / np.sqrt(values.numel()))


def _assert_context_dependent(table):
    spread = [float(v.std()) for v in _by_token(table).values() if v.numel() > 1]
    assert max(spread) > 0.3, "log-probs barely depend on the mask: the comparison would be vacuous"


def _by_token(table):
    per_token = {}
    for s, v in table.items():
        for i, lp in zip(s, v.tolist()):
            per_token.setdefault(i, []).append(lp)
    return {i: torch.tensor(v) for i, v in per_token.items()}


def test_exact_elbo_equals_the_analytic_forms(sharp):
    policy = sharp["llada"]
    prompt, response = _case(policy, 5)
    table = masked_logps(policy, prompt, response, range(5))
    _assert_context_dependent(table)
    value = exact_elbo(policy, prompt, response)
    # LLaDA's form: E_{l ~ U{1..L}} E_{|S| = l} (L / l) sum_{i in S} log p.
    llada = sum((1 / 5) * (5 / m) * np.mean([float(v.sum()) for s, v in table.items() if len(s) == m])
                for m in range(1, 6))
    # Continuous time: integral over t of (1/t) E_{S ~ Bernoulli(t)} sum_{i in S} log p, on a fine grid.
    t = np.linspace(1e-6, 1, 200001)
    integrand = sum(t ** (len(s) - 1) * (1 - t) ** (5 - len(s)) * float(v.sum()) for s, v in table.items())
    continuous = np.trapezoid(integrand, t)
    assert value == pytest.approx(llada, rel=1e-9)
    assert value == pytest.approx(continuous, rel=1e-5)
    assert sum(subset_weight(len(s), 5) * len(s) for s in table) == pytest.approx(5.0)


def test_mc_elbo_is_unbiased(sharp):
    policy = sharp["llada"]
    prompt, response = _case(policy, 5, seed=1)
    exact = exact_elbo(policy, prompt, response)
    with torch.no_grad():
        est = get_estimator("mc_elbo")(policy, _many(prompt, response), seed=3, num_samples=2)
    mean, se = _mean_se(est.seq_logp)
    assert abs(mean - exact) < 3 * se, (mean, se, exact)
    assert est.forwards == 2


@pytest.mark.parametrize("model", ["block", "block_absolute"])
def test_block_elbo_is_unbiased_for_the_block_elbo(sharp, model):
    # response: two blocks of 3; absolute alignment with a 4-token prompt: the prompt's last token opens the first
    # block, so the layout's response blocks hold 2, 3 and 1 tokens (exact_elbo follows the layout)
    policy = sharp[model]
    prompt, response = _case(policy, 6, seed=2)
    exact = exact_elbo(policy, prompt, response)
    with torch.no_grad():
        est = get_estimator("block_elbo")(policy, _many(prompt, response), seed=4, num_samples=1)
    mean, se = _mean_se(est.seq_logp)
    assert abs(mean - exact) < 3 * se, (mean, se, exact)
    assert est.forwards == 1  # all blocks in one pass


@pytest.mark.parametrize("weighting", ["time", "count"])
def test_sdmc_matches_its_exact_quadrature(sharp, weighting):
    """SDMC is a deterministic quadrature in t with random masks at each node: unbiased for that quadrature.

    Its distance to the exact ELBO is quadrature bias (large with int(t L) rounding at tiny L and the published
    1/t weights), reported by benchmarks/estimators.py rather than hidden by a loose tolerance here.
    """
    policy = sharp["llada"]
    length = 6
    prompt, response = _case(policy, length, seed=3)
    table = masked_logps(policy, prompt, response, range(length))
    t, w = quadrature("gauss", 3)
    draws = []
    for tn, wn in zip(t.tolist(), w.tolist()):
        m = min(max(1, int(tn * length)), length)
        draws.append((m, 1 / tn if weighting == "time" else length / m, wn))
    target = exact_expectation(table, length, draws)
    with torch.no_grad():
        est = get_estimator("sdmc")(policy, _many(prompt, response), seed=5, weighting=weighting)
    mean, se = _mean_se(est.seq_logp)
    assert abs(mean - target) < 3 * se + 1e-9, (mean, se, target)
    assert est.forwards == 3


def _coupled_expectation(table, length, t_min, t_max):
    """E over t ~ U(t_min, t_max) of the coupled pair, exactly: (1/2)[g(t) + g(1-t)] integrated as polynomials."""
    from numpy.polynomial import Polynomial as P

    def integral(lo, hi):
        total = 0.0
        for s, v in table.items():
            poly = P([0, 1]) ** (len(s) - 1) * P([1, -1]) ** (length - len(s))
            anti = poly.integ()
            total += float(v.sum()) * (anti(hi) - anti(lo))
        return total

    # g(1 - t) over t in [a, b] is g over [1 - b, 1 - a].
    return 0.5 * (integral(t_min, t_max) + integral(1 - t_max, 1 - t_min)) / (t_max - t_min)


@pytest.mark.parametrize("band", [(0.2, 0.8), (0.0, 1.0)])
def test_coupled_matches_its_exact_expectation(sharp, band):
    policy = sharp["llada"]
    length = 5
    prompt, response = _case(policy, length, seed=4)
    table = masked_logps(policy, prompt, response, range(length))
    target = _coupled_expectation(table, length, *band)
    if band == (0.0, 1.0):
        assert target == pytest.approx(exact_elbo(policy, prompt, response), rel=1e-9)
    with torch.no_grad():
        est = get_estimator("coupled")(policy, _many(prompt, response), seed=6, t_min=band[0], t_max=band[1])
    mean, se = _mean_se(est.seq_logp)
    assert abs(mean - target) < 3 * se, (mean, se, target)


@pytest.mark.parametrize("name, options", [
    ("one_step", {"p_mask": 0.6}), ("mc_elbo", {"num_samples": 3}), ("sdmc", {}), ("coupled", {}),
    ("block_elbo", {"num_samples": 2}), ("random_mask", {}), ("espo", {"num_samples": 2}),
    ("block_elbo", {"num_samples": 2, "share_t": True}),
])
def test_common_random_numbers_whatever_the_batch(tiny_policies, name, options):
    policy = tiny_policies["block"]
    g = torch.Generator().manual_seed(7)
    target_prompt, target_resp = torch.randint(10, 90, (5,), generator=g), torch.randint(10, 90, (8,), generator=g)
    others = [(torch.randint(10, 90, (n,), generator=g), torch.randint(10, 90, (m,), generator=g))
              for n, m in ((3, 12), (9, 4))]
    estimator = get_estimator(name)
    alone = EstimatorInput([target_prompt], [target_resp], ["the-sample"])
    mixed = EstimatorInput([others[0][0], target_prompt, others[1][0]], [others[0][1], target_resp, others[1][1]],
                           ["a", "the-sample", "b"])
    with torch.no_grad():
        one = estimator(policy, alone, seed=11, inner_iter=2, **options)
        many = estimator(policy, mixed, seed=11, inner_iter=2, **options)
        other_iter = estimator(policy, alone, seed=11, inner_iter=3, **options)
    assert torch.allclose(one.seq_logp[0], many.seq_logp[1], atol=1e-5)
    assert torch.allclose(one.token_logp[0, :8], many.token_logp[1, :8], atol=1e-5)
    assert torch.equal(one.token_mask[0, :8], many.token_mask[1, :8])
    # A new inner iteration draws new masks (d1 reseeds per inner iteration); one_step differs via the prompt.
    assert not torch.allclose(one.seq_logp, other_iter.seq_logp)


def test_one_step_equals_a_direct_fully_masked_forward(tiny_policies):
    from rl.masking import MASK_SAMPLERS, sample_generator

    policy = tiny_policies["llada"]
    prompt, response = torch.arange(10, 16), torch.arange(20, 28)
    inp = EstimatorInput([prompt], [response], ["k"])
    with torch.no_grad():
        est = get_estimator("one_step")(policy, inp, seed=1, inner_iter=0, p_mask=0.5)
        draw = MASK_SAMPLERS.get("one_step")(8, sample_generator(1, "k", 0), prompt_length=6, p_mask=0.5)
        noisy_prompt = torch.where(draw.prompt_masks[0], policy.spec.mask_token_id, prompt)
        ref = policy.score_responses([noisy_prompt], [response], [torch.full_like(response, policy.spec.mask_token_id)])
    assert draw.prompt_masks.any()
    assert torch.allclose(est.token_logp[0], ref.logprobs[0], atol=1e-6)
    assert torch.allclose(est.seq_logp[0], ref.logprobs[0].sum(), atol=1e-5)
    assert est.forwards == 1


def test_block_elbo_rejects_full_attention_models(tiny_policies):
    inp = EstimatorInput([torch.arange(10, 13)], [torch.arange(20, 24)], ["k"])
    with pytest.raises(ValueError, match="block_elbo"):
        get_estimator("block_elbo")(tiny_policies["llada"], inp)


def test_coupled_full_view_adds_half_the_fully_masked_log_probs(tiny_policies):
    policy = tiny_policies["llada"]
    prompt, response = torch.arange(10, 15), torch.arange(20, 26)
    inp = EstimatorInput([prompt], [response], ["k"])
    with torch.no_grad():
        pair = get_estimator("coupled")(policy, inp, seed=2)
        three = get_estimator("coupled")(policy, inp, seed=2, full_mask_view=True)
        full = policy.score_responses([prompt], [response], [torch.full_like(response, policy.spec.mask_token_id)])
    expected = pair.extra["token_elbo"][0] + 0.5 * full.logprobs[0]
    assert torch.allclose(three.token_logp[0], expected, atol=1e-5)
    assert torch.allclose(three.seq_logp[0], expected.sum(), atol=1e-5)
    assert three.forwards == 3


def test_per_copy_terms_reassemble_the_estimate(tiny_policies):
    policy = tiny_policies["llada"]
    inp = EstimatorInput([torch.arange(10, 14)] * 2, [torch.arange(20, 26), torch.arange(30, 34)], ["a", "b"])
    with torch.no_grad():
        est = get_estimator("mc_elbo")(policy, inp, seed=1, num_samples=3)
    mc_logp, mc_weights = est.extra["mc_logp"], est.extra["mc_weights"]
    assert mc_logp.shape == (2, 3, 6)
    assert torch.allclose((mc_logp * mc_weights).sum((1, 2)), est.seq_logp, atol=1e-5)


@pytest.mark.parametrize("prompt_len", [3, 4, 5])
def test_block_elbo_masks_follow_the_layout_blocks(sharp, prompt_len):
    """BD3-LM/SDAR masking: every block of the training layout gets its own level, l_b in 1..n_b of its n_b
    response tokens masked, each weighted n_b / l_b. Under `absolute` alignment the layout's first block also holds
    the prompt's tail (here 0, 1 or 2 tokens with block 3), so its response part is shorter."""
    policy = sharp["block_absolute"]
    size = policy.spec.block_size
    head = prompt_len - policy.spec.block_origin(prompt_len)
    assert head == prompt_len % size
    response = torch.arange(10, 17)  # 7 tokens
    edges = sorted({0, *range(size - head if head else size, 7, size), 7})
    blocks = [range(a, b) for a, b in zip(edges[:-1], edges[1:])]
    assert sum(len(b) for b in blocks) == 7 and len(blocks) >= 3
    inp = EstimatorInput([torch.arange(20, 20 + prompt_len)] * 50, [response] * 50, [f"k{i}" for i in range(50)])
    with torch.no_grad():
        est = get_estimator("block_elbo")(policy, inp, seed=1, num_samples=1)
    weights = est.extra["mc_weights"][:, 0, :]  # (50, 7): n_b / l_b on masked tokens, 0 elsewhere
    assert weights.shape == (50, 7)
    for block in blocks:
        w = weights[:, list(block)]
        counts = (w > 0).sum(1)
        assert bool((counts >= 1).all()), f"a draw left layout block {list(block)} unmasked"
        expected = len(block) / counts.clamp(min=1).double()
        assert torch.allclose(w.double().max(1).values, expected, rtol=1e-6), (block, w)
