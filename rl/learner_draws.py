"""One Monte Carlo draw per forward + backward (BGPO's constant-memory gradient accumulation), for the Learner.

A loss linear in the draws (rl.algorithms.bgpo) is the sum of its per-draw parts, so backpropagating each part
as soon as its draw is scored accumulates exactly the gradient of the whole loss while only that draw's graph is
alive. The old policy's per-draw ELBO shares are scored draw by draw as well, on the very rows training will use,
so that the first on-policy step sees every per-draw ratio equal to 1 bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from rl.algorithms.bgpo import draw_elbos
from rl.estimators.base import Estimate

LOSS_PARTS = ("loss", "pg_loss", "kl_loss", "value_loss")  # additive over the draws; every other metric averages


def check_per_draw(estimator: str, need_ref: bool, value_model: bool) -> None:
    """Per-draw backward needs a mask-sampling estimator, and no reference or value model (BGPO uses neither)."""
    if estimator == "trajectory":
        raise ValueError("per-draw backward (BGPO): needs a Monte Carlo ELBO estimator, not 'trajectory'")
    if need_ref or value_model:
        raise ValueError("per-draw backward (BGPO): no reference model or value model (beta=0, no value_model)")


def score_draw_by_draw(estimate_draw: Callable[[int], Estimate], valid: torch.Tensor) -> tuple[Estimate, torch.Tensor]:
    """Run `estimate_draw(k)` for every draw k of the estimate. Returns draw 0's Estimate with `seq_logp` the sum of
    all draws' shares and `forwards` all draws' passes, and the (B, K) shares themselves."""
    first = estimate_draw(0)
    draws = int(first.extra["num_draws"])
    ests = [first] + [estimate_draw(k) for k in range(1, draws)]
    shares = torch.cat([draw_elbos(e.extra["mc_logp"], e.extra["mc_weights"], valid) for e in ests], dim=1)
    first.seq_logp = shares.sum(1)
    first.forwards = sum(e.forwards for e in ests)
    return first, shares


def draw_shares_of(est: Estimate, valid: torch.Tensor) -> torch.Tensor | None:
    """(B, K) per-draw ELBO shares of a whole estimate (None for estimators without per-forward terms)."""
    if "mc_logp" not in est.extra:
        return None
    return draw_elbos(est.extra["mc_logp"], est.extra["mc_weights"], valid)


def stacked_shares(rows: list[torch.Tensor | None], device) -> torch.Tensor | None:
    """(B, K) old shares of a micro-batch when every sample has K of them (the same number of draws), else None."""
    if any(r is None for r in rows) or len({int(r.numel()) for r in rows}) != 1:
        return None
    return torch.stack(rows).to(device)


def merge_draw_metrics(per_draw: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One micro-batch's metrics from its draws' metrics: loss parts add up, *_max / *_min are the extremes over the
    draws, the rest is the mean over draws."""
    out = {}
    for key in per_draw[0]:
        values = torch.stack([torch.as_tensor(m[key], dtype=torch.float64) for m in per_draw])
        if key in LOSS_PARTS:
            out[key] = values.sum()
        elif key.endswith("_max"):
            out[key] = values.max()
        elif key.endswith("_min"):
            out[key] = values.min()
        else:
            out[key] = values.mean()
    return out
