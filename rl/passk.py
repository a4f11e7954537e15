"""Unbiased pass@k (Chen et al. 2021, the HumanEval paper) and avg@k.

With n samples of which c are correct, the probability that a random size-k subset holds a correct one is
`pass@k = 1 - C(n - c, k) / C(n, k)`, computed as `1 - prod_{i = n-c+1}^{n} (1 - k / i)` (no huge binomials).
avg@n is the plain mean correctness over all n samples (= pass@1).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["pass_at_k", "mean_pass_at_k", "avg_at_n"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct (needs 1 <= k <= n, 0 <= c <= n)."""
    if not (0 <= c <= n) or n < 1:
        raise ValueError(f"pass@k: need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be in 1..n={n} (draw at least k samples per problem)")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (each with its own n and c)."""
    if len(num_samples) != len(num_correct) or not num_samples:
        raise ValueError("pass@k: need one (n, c) pair per problem and at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)) / len(num_samples)


def avg_at_n(num_samples: Sequence[int], num_correct: Sequence[int]) -> float:
    """Mean per-problem accuracy over its samples (avg@n)."""
    if len(num_samples) != len(num_correct) or not num_samples:
        raise ValueError("avg@n: need one (n, c) pair per problem and at least one problem")
    return sum(c / n for n, c in zip(num_samples, num_correct)) / len(num_samples)
