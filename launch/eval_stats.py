"""Paired statistics for "did training help on these items?": flips, an exact McNemar p-value, a paired bootstrap
confidence interval, and the held-out overlap check. Pure Python (numpy for the bootstrap's resampling only).

    cmp = compare_paired(before={"q1": 1.0, "q2": 0.0, ...}, after={"q1": 1.0, "q2": 1.0, ...}, seed=0)
    cmp.fixed, cmp.broken, cmp.p_value, cmp.ci_low, cmp.ci_high        # per-item flips, exact p, 95% CI of the gain
    overlapping_prompts(train_texts, eval_texts)                       # eval items whose prompt is also trained on

Why paired: two checkpoints scored on the same items differ on few of them; testing the two accuracies as if they
were independent samples throws that pairing away and needs far larger gains to see anything. McNemar's exact test
looks only at the discordant items: under "no difference" an item that flips is equally likely to flip either way,
so the number fixed among the f + b flips is Binomial(f + b, 1/2); the two-sided p-value is
min(1, 2 * P[X <= min(f, b)]), computed with integers (math.comb), no normal approximation. With several samples per
item (per-item accuracy in [0, 1]) the same test counts items whose accuracy went up against those where it went
down: the exact sign test, of which McNemar is the 0/1 case.

The bootstrap resamples items with replacement (the same items for both checkpoints: paired) and reports the
percentile interval of the mean accuracy difference; its generator is seeded explicitly (numpy PCG64), so a report
is reproducible to the last digit.
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Iterable, Mapping, Sequence

__all__ = ["PairedComparison", "compare_paired", "mcnemar_exact", "sign_test_exact", "paired_bootstrap_ci",
           "normalise_prompt", "overlapping_prompts", "ItemSetMismatch"]


class ItemSetMismatch(ValueError):
    """The two evaluations do not cover the same items: a paired comparison would be meaningless."""


# ------------------------------------------------------------------------------------------------ exact tests
def sign_test_exact(up: int, down: int) -> float:
    """Two-sided exact binomial test of `up` successes in `up + down` trials at p = 1/2 (ties already left out).

    The distribution is symmetric, so the two-sided p-value is twice the smaller tail, capped at 1 (equal to the
    "probabilities no larger than the observed one" definition of scipy.stats.binomtest at p = 1/2)."""
    if up < 0 or down < 0:
        raise ValueError(f"sign test: counts must be >= 0, got {up}, {down}")
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(up, down) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integers until this one division


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Exact McNemar p-value from the discordant pairs: items wrong before and right after (`fixed`) and right
    before and wrong after (`broken`)."""
    return sign_test_exact(fixed, broken)


# ------------------------------------------------------------------------------------------------- bootstrap
def paired_bootstrap_ci(before: Sequence[float], after: Sequence[float], *, confidence: float = 0.95,
                        resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(after - before) over `resamples` item resamples (with replacement, one index set
    for both: paired), drawn from numpy's PCG64 seeded with `seed`."""
    import numpy as np

    if len(before) != len(after) or not before:
        raise ValueError(f"bootstrap: need equally long, non-empty score lists (got {len(before)} and {len(after)})")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must be in (0, 1), got {confidence}")
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(diff))  # bounded memory: at most ~2M indices at a time
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means[start:start + rows] = diff[rng.integers(0, len(diff), size=(rows, len(diff)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


# ------------------------------------------------------------------------------------------ paired comparison
@dataclass(frozen=True)
class PairedComparison:
    items: int
    before: float  # mean per-item score (accuracy) of the baseline
    after: float
    diff: float  # after - before
    fixed: int  # items whose score went up (0/1 scores: wrong -> right)
    broken: int  # items whose score went down (right -> wrong)
    both_right: int  # score 1 in both (0/1 scores; items at 1.0 for per-item accuracies)
    both_wrong: int
    p_value: float  # exact McNemar (0/1) / sign test (per-item accuracies), two-sided
    ci_low: float  # paired bootstrap interval of `diff`
    ci_high: float
    confidence: float
    seed: int
    test: str  # "mcnemar_exact" | "sign_test_exact"

    def to_dict(self) -> dict:
        return asdict(self)


def compare_paired(before: Mapping[str, float], after: Mapping[str, float], *, confidence: float = 0.95,
                   resamples: int = 10_000, seed: int = 0, what: str = "items") -> PairedComparison:
    """Paired comparison of two evaluations keyed by item id (scores in [0, 1]: 0/1 correctness, or the fraction
    of an item's samples that are correct). Refuses item sets that differ (ItemSetMismatch, one line)."""
    missing, extra = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    if missing or extra:
        example = (f"{missing[0]!r} only in the baseline" if missing else f"{extra[0]!r} only in the new one")
        raise ItemSetMismatch(f"{what}: the two evaluations cover different items ({len(missing)} only in the "
                              f"baseline, {len(extra)} only in the new one; e.g. {example}): not a paired comparison")
    if not before:
        raise ItemSetMismatch(f"{what}: no items to compare")
    ids = sorted(before)
    b = [float(before[i]) for i in ids]
    a = [float(after[i]) for i in ids]
    for name, scores in (("baseline", b), ("new", a)):
        bad = next((x for x in scores if not 0.0 <= x <= 1.0 or math.isnan(x)), None)
        if bad is not None:
            raise ValueError(f"{what}: {name} score {bad!r} outside [0, 1]")
    binary = all(x in (0.0, 1.0) for x in a + b)
    fixed = sum(y > x for x, y in zip(b, a))
    broken = sum(y < x for x, y in zip(b, a))
    low, high = paired_bootstrap_ci(b, a, confidence=confidence, resamples=resamples, seed=seed)
    return PairedComparison(
        items=len(ids), before=sum(b) / len(b), after=sum(a) / len(a), diff=(sum(a) - sum(b)) / len(b),
        fixed=fixed, broken=broken, both_right=sum(x == 1.0 and y == 1.0 for x, y in zip(b, a)),
        both_wrong=sum(x == 0.0 and y == 0.0 for x, y in zip(b, a)), p_value=sign_test_exact(fixed, broken),
        ci_low=low, ci_high=high, confidence=confidence, seed=seed,
        test="mcnemar_exact" if binary else "sign_test_exact")


# ------------------------------------------------------------------------------------------ held-out overlap
def normalise_prompt(text: str) -> str:
    """A prompt's identity for the overlap check: Unicode NFKC, case-folded, runs of whitespace as one space,
    stripped. Two prompts that differ only in spacing, case or compatibility characters (fullwidth digits) are the
    same problem to a model."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def overlapping_prompts(train: Iterable[str], heldout: Sequence[str],
                        key: Callable[[str], Hashable | None] | None = None) -> list[int]:
    """Indices of `heldout` prompts that are also training prompts: the same problem by `key` (e.g. a generated
    task's canonical problem key: `3,5,7->22:` and `7,3,5->22:` are one problem) where it reads the prompt, else the
    same normalised text."""
    def identity(text: str) -> tuple:
        problem = key(text) if key is not None else None
        return ("problem", problem) if problem is not None else ("text", normalise_prompt(text))

    seen = {identity(t) for t in train}
    return [i for i, text in enumerate(heldout) if identity(text) in seen]
