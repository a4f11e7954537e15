"""GDPO: sequence-level clipped objective on ELBO estimates (SDMC).

r_i = exp((ELBO_theta(y_i) - ELBO_old(y_i)) / L_i), l_i = -min(r_i A_i, clip(r_i) A_i) [+ beta k3 on the
length-normalised sequence log-ratio to ref or old]; default aggregation: mean over sequences, -(1/G) sum_g.
L_i (config.seq_length): "generation" = `batch.lengths`, the response's decoded length (GDPO divides by the fixed
generation length), or "valid" = its tokens through the first EOS (`batch.token_mask`). Never the number of tokens
the estimator happened to mask. The ELBOs themselves cover the tokens through the first EOS (the estimators'
`seq_logp`).
"""
from __future__ import annotations

from collections.abc import Callable

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
    importance_ratio,
    kl_penalty,
    kl_term,
    masked_stats,
    normalizer_of,
    ratio_metrics,
    require,
    safe,
)
from rl.published import ALGORITHM_DEFAULTS


def sequence_lengths(batch: PolicyBatch, config: LossConfig, name: str) -> torch.Tensor:
    """L_i of each sequence (config.seq_length), independent of the estimator's draws."""
    if config.seq_length == "valid":
        return batch.token_mask.bool().sum(1)
    if batch.lengths is None:
        raise ValueError(f"loss '{name}' with seq_length='generation' needs batch.lengths (the decoded response "
                         "lengths; the learner sets them)")
    return batch.lengths


SequenceKL = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]  # (seq, target, L, estimator)


def length_normalized_kl(seq: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, estimator: str) -> torch.Tensor:
    """GDPO's sequence KL: the estimator on the length-normalised ELBOs, ELBO / L."""
    return kl_penalty(seq / scale, target / scale, estimator)


def sequence_clipped_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig, name: str,
                          kl_fn: SequenceKL | None) -> tuple[torch.Tensor, Metrics]:
    """Clipped surrogate on one sequence-level ratio exp((ELBO - ELBO_old) / L) (L = 1 without length_normalize),
    broadcast onto the sequence's counted tokens, plus beta * kl_fn(ELBO, ELBO_ref or old, L, estimator) clamped to
    kl_clamp. GDPO, ESPO and EBPO differ only in kl_fn and their defaults. kl_fn None: the KL is per token
    (core.kl_term on estimates.logp over the counted tokens), as IGPO's GSPO option keeps d1's token k3."""
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

    ratio = importance_ratio(safe((seq - old.detach()) / scale, rows), config)
    pg_seq = safe(clipped_surrogate(ratio, adv, config.clip_eps_low, config.eps_high), rows)
    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(pg_seq[:, None].expand(mask.shape), mask, config.loss_agg, norm, step_ids=batch.step_ids)

    kl_loss, kl_seq = None, None
    if config.beta != 0 and kl_fn is None:
        kl_tok = kl_term(est, mask, config, name)
        kl_loss = config.beta * aggregate(kl_tok, mask, config.loss_agg, norm, step_ids=batch.step_ids)
    elif config.beta != 0:
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
    elif kl_loss is not None:
        metrics["kl"] = masked_stats(kl_tok, mask)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": kl_loss}, metrics)


@LOSSES.register("gdpo", **ALGORITHM_DEFAULTS["gdpo"].loss)
def gdpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    return sequence_clipped_loss(batch, est, config, "gdpo", kl_fn=length_normalized_kl)
