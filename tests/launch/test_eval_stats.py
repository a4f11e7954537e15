"""launch/eval_stats.py: exact McNemar against hand-computed values and a brute-force enumeration, the paired
bootstrap's determinism and coverage, paired comparisons, and the held-out overlap check."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from launch.eval_stats import (ItemSetMismatch, compare_paired, mcnemar_exact, normalise_prompt, overlapping_prompts,
                               paired_bootstrap_ci, sign_test_exact)


@pytest.mark.parametrize("fixed,broken,expected", [
    (0, 0, 1.0),  # no discordant pair: no evidence either way
    (5, 5, 1.0),
    (0, 1, 1.0),  # 2 * 1/2
    (0, 5, 0.0625),  # 2 / 2^5
    (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10
    (2, 8, 112 / 1024),  # 2 * (1 + 10 + 45) / 2^10 = 0.109375
    (8, 2, 112 / 1024),
    (7, 0, 2 / 128),
])
def test_mcnemar_hand_computed(fixed, broken, expected):
    assert mcnemar_exact(fixed, broken) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_issue_19_figure():
    # issue 19: seed 0 fixed 35 items and broke 25, "exact McNemar p = 0.25"; 2 * P[Bin(60, 1/2) <= 25]
    exact = 2 * Fraction(sum(__import__("math").comb(60, i) for i in range(26)), 2 ** 60)
    assert mcnemar_exact(35, 25) == pytest.approx(float(exact), rel=1e-12)
    assert mcnemar_exact(35, 25) == pytest.approx(0.2450608, abs=1e-7)


def _brute_force_p(up: int, down: int) -> Fraction:
    """Enumerate every +/- pattern of n = up + down fair coin flips: the p-value is the share of patterns at
    least as lopsided as the observed one (smaller side <= the observed smaller side)."""
    n = up + down
    observed = min(up, down)
    extreme = sum(1 for signs in itertools.product((0, 1), repeat=n) if min(sum(signs), n - sum(signs)) <= observed)
    return Fraction(extreme, 2 ** n)


@pytest.mark.parametrize("n", range(0, 13))
def test_mcnemar_equals_enumeration(n):
    for up in range(n + 1):
        assert sign_test_exact(up, n - up) == pytest.approx(float(_brute_force_p(up, n - up)), rel=1e-12)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts"):
        mcnemar_exact(-1, 3)


def test_bootstrap_is_deterministic_in_its_seed():
    rng = np.random.default_rng(1)
    before = rng.integers(0, 2, 150).tolist()
    after = rng.integers(0, 2, 150).tolist()
    first = paired_bootstrap_ci(before, after, seed=7, resamples=2000)
    assert first == paired_bootstrap_ci(before, after, seed=7, resamples=2000)
    assert first != paired_bootstrap_ci(before, after, seed=8, resamples=2000)
    diff = (sum(after) - sum(before)) / 150
    assert first[0] < diff < first[1]


def test_bootstrap_degenerate_and_bad_input():
    assert paired_bootstrap_ci([1, 0, 1], [1, 0, 1], resamples=100) == (0.0, 0.0)
    assert paired_bootstrap_ci([0, 0], [1, 1], resamples=100) == (1.0, 1.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_ci([1], [1, 0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci([1], [0], confidence=1.0)


def test_bootstrap_coverage_is_near_nominal():
    """Paired Bernoulli data with a known accuracy difference (0.55 - 0.45): a 90% interval should contain it in
    about 90% of simulated evaluations; a wrong pairing or a wrong quantile would miss by far."""
    rng = np.random.default_rng(2026)
    trials, items, covered = 300, 120, 0
    for t in range(trials):
        before = rng.random(items) < 0.45
        # correlated pairs: after = before mostly, with flips giving a true difference of +0.10
        flip_up = (~before) & (rng.random(items) < 0.10 / 0.55)
        after = before | flip_up
        true_diff = 0.10
        low, high = paired_bootstrap_ci(before.astype(float).tolist(), after.astype(float).tolist(),
                                        confidence=0.90, resamples=1000, seed=t)
        covered += low <= true_diff <= high
    assert 0.84 <= covered / trials <= 0.96, covered / trials


def test_compare_paired_counts_flips_and_tests():
    before = {"a": 1, "b": 0, "c": 0, "d": 1, "e": 0}
    after = {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0}
    cmp = compare_paired(before, after, resamples=500, seed=3)
    assert (cmp.items, cmp.fixed, cmp.broken, cmp.both_right, cmp.both_wrong) == (5, 2, 1, 1, 1)
    assert cmp.before == pytest.approx(0.4) and cmp.after == pytest.approx(0.6) and cmp.diff == pytest.approx(0.2)
    assert cmp.p_value == 1.0 and cmp.test == "mcnemar_exact"  # 2 up, 1 down: 2 * (1 + 3) / 8 capped at 1
    assert cmp.ci_low <= cmp.diff <= cmp.ci_high


def test_compare_paired_fractional_scores_use_the_sign_test():
    before = {str(i): 0.25 for i in range(10)}
    after = {**{str(i): 0.75 for i in range(9)}, "9": 0.25}  # 9 items up, one tie
    cmp = compare_paired(before, after, resamples=200)
    assert cmp.test == "sign_test_exact" and (cmp.fixed, cmp.broken) == (9, 0)
    assert cmp.p_value == pytest.approx(2 / 512)


def test_compare_paired_refuses_different_item_sets():
    with pytest.raises(ItemSetMismatch, match="1 only in the baseline, 1 only in the new one"):
        compare_paired({"a": 1, "b": 0}, {"a": 1, "c": 0})
    with pytest.raises(ValueError, match="outside"):
        compare_paired({"a": 2}, {"a": 1})


def test_overlap_check_normalises_prompts():
    train = ["37+85=", "What is  2+2?", "ＡＢＣ"]
    heldout = ["12+3=", "what is 2+2? ", "abc", "37+86="]
    assert normalise_prompt(" What\tis 2+2?\n") == "what is 2+2?"
    assert overlapping_prompts(train, heldout) == [1, 2]
