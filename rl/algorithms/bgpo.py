"""BGPO (Boundary-Guided Policy Optimization, Lin et al. 2025, arXiv 2510.11683): a lower bound of the ELBO-based
objective that is LINEAR in the Monte Carlo draws, so the learner can run forward + backward one draw at a time
(`per_draw_backward`: one draw's graph alive, memory constant in the number of draws).

With K draws, ell_k the k-th draw's full ELBO estimate (the ELBO estimate is their mean), and
delta_k = ell_k^theta - ell_k^old (the same masks for both), the ELBO objective of sample i is A_i exp(mean_k delta_k).
Its bound, term by term:
    A_i > 0:   A_i exp(mean_k delta_k) >= A_i (1 + mean_k delta_k) = (1/K) sum_k A_i (1 + delta_k)   (exp x >= 1 + x)
    A_i <= 0:  A_i exp(mean_k delta_k) >= (1/K) sum_k A_i exp(delta_k)                            (Jensen)
    loss = -(mean over sequences of the bound)
Both sides agree in value and gradient on-policy (every delta_k = 0), the paper's "equivalence"; each term depends
on one draw only, its "linearity". `length_normalize` divides every delta_k by L_i (an option; off by default).
No clipping and no KL: the bound is the on-policy objective (mu 1).

The k-th draw's share of the ELBO estimate is e_k = sum_j w_kj log p_kj (the estimator's MaskDraw weights, which
carry the 1/K), so ell_k = K e_k; with one draw per call the learner passes `mc_draws` = K.
"""
from __future__ import annotations

import torch

from rl.algorithms.core import (
    LOSSES,
    LossConfig,
    Metrics,
    PolicyBatch,
    PolicyEstimates,
    aggregate,
    common_metrics,
    counted_mask,
    finish,
    masked_stats,
    normalizer_of,
    ratio_metrics,
    require,
    safe,
)
from rl.algorithms.sequence import sequence_lengths
from rl.published import ALGORITHM_DEFAULTS


def draw_elbos(mc_logp: torch.Tensor, mc_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) each forward's share of the ELBO estimate over the counted tokens of (B, L) `mask`."""
    w = torch.where(mask[:, None, :], mc_weights.detach().to(mc_logp.dtype), torch.zeros((), dtype=mc_logp.dtype))
    return (w * torch.where(w != 0, mc_logp, torch.zeros((), dtype=mc_logp.dtype))).sum(-1)


def bgpo_bound(delta: torch.Tensor, adv: torch.Tensor, total_draws: int) -> torch.Tensor:
    """(B,) this call's part of the bound, (1/K) sum over the given draws of A (1 + delta_k) (A > 0) or
    A exp(delta_k) (A <= 0); `delta` (B, K') holds the log-ratios of the K' <= K draws present."""
    positive = (adv > 0)[:, None]
    terms = torch.where(positive, adv[:, None] * (1 + delta), adv[:, None] * torch.exp(delta))
    return terms.sum(1) / total_draws


@LOSSES.register("bgpo", **ALGORITHM_DEFAULTS["bgpo"].loss)
def bgpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    name = "bgpo"
    if config.beta != 0:
        raise ValueError("loss 'bgpo' has no KL term: set beta=0")
    mask = counted_mask(batch, est, config.observed_only)
    b, length = mask.shape
    mc_logp = require(est, "mc_logp", None, name)
    if mc_logp.dim() != 3 or mc_logp.shape[0] != b or mc_logp.shape[2] != length:
        raise ValueError(f"estimates.mc_logp shape {tuple(mc_logp.shape)} != ({b}, K, {length})")
    mc_weights = require(est, "mc_weights", mc_logp.shape, name)
    shares = draw_elbos(mc_logp, mc_weights, mask)
    draws = shares.shape[1]
    old = require(est, "mc_old_elbo", shares.shape, name) if est.mc_old_elbo is not None else shares
    total = draws if est.mc_draws is None else int(est.mc_draws)
    if total < draws:
        raise ValueError(f"estimates.mc_draws {total} < the {draws} draws given")
    adv = require(batch, "advantages", (b,), name).detach().to(shares.dtype)
    rows = mask.any(1)
    scale = sequence_lengths(batch, config, name).to(shares.dtype).clamp(min=1) if config.length_normalize \
        else torch.ones(b, dtype=shares.dtype, device=shares.device)
    delta = total * (shares - old.detach().to(shares.dtype)) / scale[:, None]
    delta = torch.where(rows[:, None], delta, torch.zeros((), dtype=delta.dtype))
    per_seq = safe(-bgpo_bound(delta, adv, total), rows)
    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(per_seq[:, None].expand(mask.shape), mask, config.loss_agg, norm, step_ids=batch.step_ids)

    metrics = common_metrics(batch, est, mask, adv)
    ratio = torch.exp(delta.detach()).mean(1)  # mean over the draws present of each draw's ratio
    metrics.update(ratio_metrics(ratio, adv, rows, config))
    metrics["elbo"] = masked_stats(shares.detach().sum(1) * total / draws, rows)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": None}, metrics)
