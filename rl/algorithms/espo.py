"""ESPO (ELBO-based Sequence-level Policy Optimization, Ou et al. 2025, ML-GSAI/ESPO): the whole response is one
action, its log-likelihood the ELBO.

    rho_i = exp((ELBO_theta(y_i) - ELBO_old(y_i)) / L_i)                 per-token normalised sequence ratio
    l_i   = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)
          + beta * 0.5 (ELBO_theta(y_i) - ELBO_ref(y_i))^2 / L_i         the robust (k2) sequence KL
    loss  = mean over sequences of l_i

As ESPO's code: the ELBO covers every generated token (EOS padding included: token_set "response") and L_i is the
generation length (`logits_to_keep`); the k2 estimator is applied to the raw sequence ELBOs and divided by L (their
`kl.sum() / (batch_size * logits_to_keep)`), which keeps its gradient (ELBO - ELBO_ref) / L free of the exponential
that makes k3 blow up at sequence level. `kl_estimator` "k3" (on the length-normalised log-ratio, as GDPO's option)
and "k1" are options; the ELBO comes from the `espo` estimator (rl/estimators/espo.py) by default.
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
    clipped_surrogate,
    common_metrics,
    counted_mask,
    finish,
    kl_penalty,
    masked_stats,
    normalizer_of,
    ratio_metrics,
    require,
    safe,
)
from rl.algorithms.sequence import sequence_lengths
from rl.published import ALGORITHM_DEFAULTS


def sequence_kl(seq: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, estimator: str) -> torch.Tensor:
    """ESPO's sequence KL: k2 = 0.5 (ELBO - ELBO_target)^2 / L; k1 / k3 on the length-normalised ELBOs."""
    if estimator == "k2":
        return 0.5 * (seq - target) ** 2 / scale
    return kl_penalty(seq / scale, target / scale, estimator)


def sequence_clipped_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig, name: str,
                          kl_fn=sequence_kl) -> tuple[torch.Tensor, Metrics]:
    """Clipped surrogate on one sequence-level ratio exp((ELBO - ELBO_old) / L) (L = 1 without length_normalize),
    broadcast onto the sequence's counted tokens, plus beta * kl_fn(ELBO, ELBO_ref or old, L, estimator)."""
    mask = counted_mask(batch, est, config.observed_only)
    b = mask.shape[0]
    seq = require(est, "seq_logp", (b,), name)
    old = require(est, "seq_old_logp", (b,), name) if est.seq_old_logp is not None else seq
    adv = require(batch, "advantages", (b,), name).detach().to(seq.dtype)
    lengths = sequence_lengths(batch, config, name)
    if lengths.shape != (b,):
        raise ValueError(f"batch.lengths shape {tuple(lengths.shape)} != ({b},)")
    scale = lengths.to(seq.dtype).clamp(min=1) if config.length_normalize else torch.ones_like(seq)
    rows = mask.any(1)

    log_ratio = safe((seq - old.detach()) / scale, rows)
    if config.ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-config.ratio_clamp, config.ratio_clamp)
    ratio = torch.exp(log_ratio)
    pg_seq = safe(clipped_surrogate(ratio, adv, config.clip_eps_low, config.eps_high), rows)
    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(pg_seq[:, None].expand(mask.shape), mask, config.loss_agg, norm, step_ids=batch.step_ids)

    kl_loss, kl_seq = None, None
    if config.beta != 0:
        target = est.seq_ref_logp if config.kl_reference == "ref" else old
        if target is None:
            raise ValueError(f"loss '{name}' with kl_reference='ref' needs estimates.seq_ref_logp")
        kl_seq = kl_fn(seq, target.detach(), scale, config.kl_estimator)
        if config.kl_clamp is not None:
            kl_seq = kl_seq.clamp(-config.kl_clamp, config.kl_clamp)
        kl_seq = safe(kl_seq, rows)
        kl_loss = config.beta * aggregate(kl_seq[:, None].expand(mask.shape), mask, config.loss_agg, norm,
                                          step_ids=batch.step_ids)

    metrics = common_metrics(batch, est, mask, adv)
    metrics.update(ratio_metrics(ratio, adv, rows, config))
    metrics["elbo_per_token"] = masked_stats(seq / scale, rows)[0]
    if kl_seq is not None:
        metrics["kl"] = masked_stats(kl_seq, rows)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": kl_loss}, metrics)


@LOSSES.register("espo", **ALGORITHM_DEFAULTS["espo"].loss)
def espo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    return sequence_clipped_loss(batch, est, config, "espo")
