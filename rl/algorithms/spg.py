"""SPG (sandwiched policy gradient): -A_i * s_i with s_i the ELBO (a lower bound of log pi) when A_i > 0 and,
when A_i <= 0, the EUBO upper bound mixed with the ELBO, from K masked forwards of the same sample.

With token weights w_kj (MaskDraw.token_weights, e.g. 1/(K t_k) on masked tokens) and log-probs lp_kj:
  ELBO_i = sum_kj w_kj lp_kj over tokens through the first EOS   (/ L_i when length_normalize; L_i per
                                                       config.seq_length, SPG default "valid": the tokens through
                                                       the first EOS, never the draw-dependent masked count)
  EUBO_i = sum_j (1/beta_E) log sum_k w_kj exp(beta_E lp_kj)   over tokens masked in some forward
                                                       (/ their number when length_normalize)
  s_i = ELBO_i if A_i > 0 else mix * EUBO_i + (1 - mix) * ELBO_i     (mix = 1: SPG w/ EUBO; 0.5: SPG w/ mixture)
As in the released code (facebookresearch/SPG): block-wise random masks (estimator `block_random`), length-normalised
bounds, beta_E 1.5, loss weighted by length (token_mean). The released per-forward mean over masked tokens comes from
the sampler's weights (block_random weighting="released": v / (K m_k)), so ELBO_i / v here is exactly it.
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
    require,
    safe,
)
from rl.algorithms.sequence import sequence_lengths
from rl.published import ALGORITHM_DEFAULTS


def spg_bounds(mc_logp: torch.Tensor, mc_weights: torch.Tensor, mask: torch.Tensor, beta: float,
               length_normalize: bool = True, lengths: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ELBO, EUBO) per sample from (B, K, L) log-probs and token weights and the (B, L) counted mask; the ELBO is
    divided by `lengths` (B,) (default: the counted tokens per sample) when length_normalize."""
    w = torch.where(mask[:, None, :], mc_weights.detach().to(mc_logp.dtype), torch.zeros((), dtype=mc_logp.dtype))
    scored = w > 0
    lp = torch.where(scored, mc_logp, torch.zeros((), dtype=mc_logp.dtype))
    elbo = (w * lp).sum(dim=(1, 2))
    seen = scored.any(1)  # (B, L) tokens masked in at least one forward
    inner = torch.where(scored, w.clamp(min=1e-30).log() + beta * lp,
                        torch.full((), -torch.inf, dtype=lp.dtype))
    inner = torch.where(seen[:, None, :], inner, torch.zeros((), dtype=lp.dtype))  # keep unseen rows finite
    eubo_tok = torch.where(seen, torch.logsumexp(inner, dim=1) / beta, torch.zeros((), dtype=lp.dtype))
    eubo = eubo_tok.sum(1)
    if length_normalize:
        divisor = mask.sum(1) if lengths is None else lengths
        elbo = elbo / divisor.clamp(min=1).to(elbo.dtype)
        eubo = eubo / seen.sum(1).clamp(min=1).to(eubo.dtype)
    return elbo, eubo


@LOSSES.register("spg", **ALGORITHM_DEFAULTS["spg"].loss)
def spg_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    name = "spg"
    if config.beta != 0:
        raise ValueError("loss 'spg' has no KL term: set beta=0")
    mask = counted_mask(batch, est, config.observed_only)
    b, length = mask.shape
    mc_logp = require(est, "mc_logp", None, name)
    if mc_logp.dim() != 3 or mc_logp.shape[0] != b or mc_logp.shape[2] != length:
        raise ValueError(f"estimates.mc_logp shape {tuple(mc_logp.shape)} != ({b}, K, {length})")
    mc_weights = require(est, "mc_weights", mc_logp.shape, name)
    adv = require(batch, "advantages", (b,), name).detach().to(mc_logp.dtype)

    elbo, eubo = spg_bounds(mc_logp, mc_weights, mask, config.beta_e, config.length_normalize,
                            sequence_lengths(batch, config, name))
    negative = config.mix * eubo + (1 - config.mix) * elbo
    positive = adv > 0
    surrogate = torch.where(positive, elbo, negative)
    rows = mask.any(1)
    per_seq = safe(-adv * surrogate, rows)
    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(per_seq[:, None].expand(mask.shape), mask, config.loss_agg, norm, step_ids=batch.step_ids)

    metrics = common_metrics(batch, est, mask, adv)
    metrics["elbo"] = masked_stats(elbo, rows)[0]
    metrics["eubo"] = masked_stats(eubo, rows)[0]
    metrics["frac_positive"] = masked_stats(positive.double(), rows)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": None}, metrics)
