"""JustGRPO (LeapLabTHU/JustGRPO, arXiv 2601.15165): plain GRPO on a dLLM decoded in AR order, exact log-probs.

Rollouts unmask one token a step, left to right (rollout remasking `left_to_right`), the whole canvas (no stop at
EOS); the learner scores log p(y_t | prompt, y_<t, masks after t) exactly (estimator `ar_exact`). Per sample i with
advantage A_i != 0 and every generated position t of the L = gen_length positions (EOS padding included):

    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i),   rho_it = pi(y_it | .) / pi_old(y_it | .)
    loss = sum_{i: A_i != 0} sum_t l_it / (L * #{i: A_i != 0})

(grpo.py `logprob_loss`: scale = 1 / gen_length / valid_samples, valid_samples = (advantages != 0).sum()), with
A_i = (R_i - mean_g R) / (std_g R + 1e-4), std the unbiased (n - 1) one (`compute_group_advantages`, torch's
default std), eps 0.2, no KL, one inner step (pi_old = pi detached).

Here: the advantage estimator `justgrpo` marks samples with A_i == 0 keep=False, so the learner drops them and
the per-sequence mean over the kept samples (`seq_mean_token_mean`; every response has the L positions) is the
division by L * valid_samples. One difference of scale: JustGRPO sums the gradients of its grad_accum rounds
(each normalised by its own valid count) where diffrl normalises the whole batch once.
"""
from __future__ import annotations

from functools import partial

import torch

from rl.advantages import ADVANTAGES, AdvantageResult, group_index
from rl.algorithms.core import LOSSES
from rl.algorithms.ppo import token_ppo_loss
from rl.published import ALGORITHM_DEFAULTS

JUSTGRPO_STD_EPS = 1e-4  # grpo.py compute_group_advantages: (r - mean) / (std + 1e-4)


def justgrpo_group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(R - group mean) / (unbiased group std + 1e-4), float64; 0 in a group of one (no spread to measure)."""
    idx, n = group_index(rewards, None, group_ids)
    r = rewards.detach().to(torch.float64)
    count = torch.zeros(n, dtype=r.dtype).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(n, dtype=r.dtype).index_add_(0, idx, r) / count
    var = torch.zeros(n, dtype=r.dtype).index_add_(0, idx, (r - mean[idx]) ** 2) / (count - 1).clamp(min=1)
    adv = (r - mean[idx]) / (var.sqrt()[idx] + JUSTGRPO_STD_EPS)
    return torch.where(count[idx] > 1, adv, torch.zeros_like(adv))


@ADVANTAGES.register("justgrpo")
def justgrpo_advantages(rewards: torch.Tensor, *, group_ids: torch.Tensor | None = None,
                        group_size: int | None = None, norm: str = "zscore", drop_zero_variance: bool = False,
                        accuracy_lo: float | None = None, accuracy_hi: float | None = None,
                        correct: torch.Tensor | None = None, **_unused) -> AdvantageResult:
    """JustGRPO's advantages; samples with A == 0 (their group's rewards all equal, or R exactly the mean) are not
    `valid_samples`: keep=False, so neither the loss nor its normaliser counts them."""
    if norm != "zscore" or accuracy_lo is not None or accuracy_hi is not None:
        raise ValueError("algorithm.advantage / filter: JustGRPO's advantage is its own z-score (unbiased std + "
                         "1e-4) with no accuracy filter")
    if group_ids is None:
        group_ids, _ = group_index(rewards, group_size, None)
    adv = justgrpo_group_advantages(rewards, group_ids)
    keep = adv != 0
    idx, n = group_index(rewards, None, group_ids)
    valid = keep.to(torch.float64)
    r = rewards.detach().to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    metrics = {
        "adv_abs_mean": adv[keep].abs().mean() if bool(keep.any()) else zero,
        "reward_mean": r.mean() if r.numel() else zero,
        "accuracy": correct.to(torch.float64).mean() if correct is not None and r.numel() else zero,
        "frac_samples_kept": valid.mean() if r.numel() else zero,
        "num_groups": torch.tensor(float(n), dtype=torch.float64),
    }
    return AdvantageResult(adv.to(torch.float32), keep, idx, metrics)


LOSSES.register("justgrpo", **ALGORITHM_DEFAULTS["justgrpo"].loss)(partial(token_ppo_loss, name="justgrpo"))
