"""Group-relative advantages from scalar rewards (pure functions).

A batch holds B responses in groups (the G responses to one prompt). Groups are given either as `group_size`
(contiguous groups: sample i belongs to group i // G) or as `group_ids` (B,) of any labels, which also allows
groups of unequal size (e.g. after a failed generation). Everything is vectorised with scatter over groups.

- "mean_centered": A_i = R_i - mean_g(R)               (d1, GDPO, CJ-GRPO, wd1, SPG)
- "leave_one_out": A_i = R_i - mean of the other n_g - 1 rewards of the group = n_g / (n_g - 1) (R_i - mean_g(R))
                   (coupled-GRPO: DiffuCoder's coupled_grpo.py hard-codes leave_one_out = True; 0 in a group of one)
- "zscore":        A_i = (R_i - mean_g(R)) / (std_g(R) + eps), population std (TraceRL)
Filters (options, none hard-coded): drop groups whose rewards have zero variance; drop groups whose accuracy
(fraction of correct responses) is outside [lo, hi] (TraceRL: 0.2, 0.8). `near_length_limit` marks responses that
TraceRL counts as wrong before both (length >= max_tokens - 5 in dLLM-RL's reward/rl_reward.py).
Dropped samples get advantage 0 and keep=False; the learner removes them (or zeroes their token mask) before computing loss normalisers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl.registry import Registry

# Advantage estimators by name: fn(rewards (B,), *, group_ids | group_size, norm, correct, filter options) ->
# AdvantageResult. A loss that trains on its own transform of the group advantages registers an estimator under the
# loss's name (wd1); every other loss uses "group_relative" with the recipe's normalisation (`advantage_estimator`).
ADVANTAGES = Registry("advantage estimator")


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # (B,) float32; 0 where keep is False
    keep: torch.Tensor  # (B,) bool: the sample's group passed every filter
    group_ids: torch.Tensor  # (B,) long in 0..num_groups-1
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d detached tensors


def group_index(rewards: torch.Tensor, group_size: int | None = None,
                group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(B,) long group index in 0..n-1 and n, from `group_ids` (any labels) or contiguous `group_size`."""
    if rewards.dim() != 1:
        raise ValueError(f"advantages: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    b = rewards.numel()
    if group_ids is not None:
        if group_ids.shape != (b,):
            raise ValueError(f"advantages: group_ids shape {tuple(group_ids.shape)} != ({b},)")
        uniq, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.to(device=rewards.device), int(uniq.numel())
    if group_size is None or group_size < 1 or b % group_size:
        raise ValueError(f"advantages: group_size {group_size} does not divide batch {b} (or pass group_ids)")
    return torch.arange(b, device=rewards.device) // group_size, b // group_size


def _group_sum(x: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, idx, x)


def group_stats(rewards: torch.Tensor, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (count, mean, population std) in float64, each (n,)."""
    r = rewards.detach().to(torch.float64)
    count = _group_sum(torch.ones_like(r), idx, n)
    mean = _group_sum(r, idx, n) / count.clamp(min=1)
    var = _group_sum((r - mean[idx]) ** 2, idx, n) / count.clamp(min=1)
    return count, mean, var.sqrt()


def group_advantages(rewards: torch.Tensor, *, group_size: int | None = None, group_ids: torch.Tensor | None = None,
                     norm: str = "mean_centered", eps: float = 1e-6, drop_zero_variance: bool = False,
                     accuracy_lo: float | None = None, accuracy_hi: float | None = None,
                     correct: torch.Tensor | None = None,
                     success_threshold: float = 0.5, zero_std_tol: float = 1e-8) -> AdvantageResult:
    """Group-relative advantages, a keep mask and metrics.

    norm: "mean_centered" (R - mean), "leave_one_out" (R - mean of the others), "zscore" ((R - mean) / (std + eps), population std) or "none" (R itself).
    accuracy_lo / accuracy_hi: keep groups with lo <= accuracy <= hi (either may be None); a response is correct
      where `correct` is True, or (when `correct` is None) where reward >= success_threshold.
    drop_zero_variance: drop groups whose reward std <= zero_std_tol (they carry no group-relative signal).
    """
    idx, n = group_index(rewards, group_size, group_ids)
    count, mean, std = group_stats(rewards, idx, n)
    r = rewards.detach().to(torch.float64)
    if norm == "mean_centered":
        adv = r - mean[idx]
    elif norm == "leave_one_out":
        others = count[idx] - 1
        adv = torch.where(others > 0, (r - mean[idx]) * count[idx] / others.clamp(min=1), torch.zeros_like(r))
    elif norm == "zscore":
        adv = (r - mean[idx]) / (std[idx] + eps)
    elif norm == "none":
        adv = r.clone()
    else:
        raise ValueError(f"advantages: unknown norm '{norm}' (mean_centered | leave_one_out | zscore | none)")

    keep_group = torch.ones(n, dtype=torch.bool, device=rewards.device)
    zero_std = std <= zero_std_tol
    if drop_zero_variance:
        keep_group &= ~zero_std
    if correct is None:
        correct = r >= success_threshold
    elif correct.shape != rewards.shape:
        raise ValueError(f"advantages: correct shape {tuple(correct.shape)} != rewards {tuple(rewards.shape)}")
    accuracy = _group_sum(correct.to(torch.float64), idx, n) / count.clamp(min=1)
    if accuracy_lo is not None and accuracy_hi is not None and accuracy_lo > accuracy_hi:
        raise ValueError(f"advantages: accuracy_lo {accuracy_lo} > accuracy_hi {accuracy_hi}")
    if accuracy_lo is not None:
        keep_group &= accuracy >= accuracy_lo
    if accuracy_hi is not None:
        keep_group &= accuracy <= accuracy_hi
    keep = keep_group[idx]
    adv = torch.where(keep, adv, torch.zeros_like(adv)).to(torch.float32)

    kept = adv[keep].to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=adv.device)
    metrics = {
        "adv_mean": kept.mean() if kept.numel() else zero,
        "adv_std": kept.std(unbiased=False) if kept.numel() else zero,
        "adv_abs_mean": kept.abs().mean() if kept.numel() else zero,  # the scale the loss sees, with adv_std
        "adv_max": kept.max() if kept.numel() else zero,
        "adv_min": kept.min() if kept.numel() else zero,
        "reward_mean": r.mean() if r.numel() else zero,
        "reward_std": r.std(unbiased=False) if r.numel() else zero,
        "accuracy": correct.to(torch.float64).mean() if r.numel() else zero,
        "frac_groups_dropped": 1.0 - keep_group.to(torch.float64).mean() if n else zero,
        "frac_groups_zero_std": zero_std.to(torch.float64).mean() if n else zero,
        "frac_samples_kept": keep.to(torch.float64).mean() if r.numel() else zero,
        "num_groups": torch.tensor(float(n), dtype=torch.float64),
    }
    return AdvantageResult(adv, keep, idx, {k: v.detach() for k, v in metrics.items()})


def near_length_limit(lengths: torch.Tensor, max_tokens: int, margin: int | None) -> torch.Tensor:
    """(B,) bool: responses of at least max_tokens - margin tokens (False everywhere when margin is None). TraceRL
    treats them as wrong (reward 0, not correct): a response cut off by the limit has no verified answer."""
    if margin is None:
        return torch.zeros(lengths.shape, dtype=torch.bool, device=lengths.device)
    if margin < 0 or max_tokens < 1:
        raise ValueError(f"near_length_limit: need margin >= 0 and max_tokens >= 1, got {margin}, {max_tokens}")
    return lengths >= max_tokens - margin


def wd1_weights(advantages: torch.Tensor, group_ids: torch.Tensor, *, temperature: float = 1.0,
                scale_by_group_size: bool = True) -> torch.Tensor:
    """wd1's signed per-sample weight w_i = softmax_g(psi A)_i - softmax_g(-psi A)_i (softmax within each group),
    times the group size by default (so a mean over samples is a mean over groups of the paper's group sum).
    The wd1 loss is then -sum_i w_i log pi(o_i): pass these as the batch's `advantages`. Computed once on the
    whole batch, so splitting it into micro-batches afterwards is exact."""
    idx, n = group_index(advantages, None, group_ids)
    a = advantages.detach().to(torch.float64) * temperature

    def group_softmax(x: torch.Tensor) -> torch.Tensor:
        gmax = torch.full((n,), -torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, idx, x, "amax")
        e = torch.exp(x - gmax[idx])
        return e / _group_sum(e, idx, n)[idx]

    w = group_softmax(a) - group_softmax(-a)
    if scale_by_group_size:
        w = w * _group_sum(torch.ones_like(a), idx, n)[idx]
    return w.to(torch.float32)


ADVANTAGES.register("group_relative")(group_advantages)


@ADVANTAGES.register("wd1")
def wd1_advantages(rewards: torch.Tensor, **options) -> AdvantageResult:
    """wd1 trains on the signed softmax weights of the group advantages (0 where a filter dropped the group)."""
    result = group_advantages(rewards, **options)
    weights = wd1_weights(result.advantages, result.group_ids)
    result.advantages = torch.where(result.keep, weights, torch.zeros_like(weights))
    return result


def advantage_estimator(loss: str):
    """The advantage estimator the loss `loss` trains on: its own when registered under its name, else
    group_relative."""
    import rl.algorithms  # noqa: F401  (registers the loss-specific estimators, e.g. justgrpo)

    return ADVANTAGES.get(loss if loss in ADVANTAGES else "group_relative")
