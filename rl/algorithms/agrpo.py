"""AGRPO (probablyabot/agrpo, arXiv 2510.04019): a clipped policy gradient on individual denoising steps.

Estimator `sampled_steps` (rl/estimators/sampled_steps.py) draws K steps per sample and gives each token at a drawn
step its importance weight w_j (0 elsewhere, 1/K folded in). Per sample i and counted token j:
    rho = exp(logp - old_logp),  l_ij = w_ij * ( -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)
                                                 + beta * rho * k3(pi || ref) )
(the KL term times rho is the DeepSeek-V3.2 correction the reference applies), and the loss is
sum_ij l_ij / number of sequences (`seq_mean_token_sum`: agrpo_trainer.py divides the summed per-draw losses by
mc_samples * num_generations with one group per device batch).
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
    token_advantages,
)
from rl.published import ALGORITHM_DEFAULTS


@LOSSES.register("agrpo", **ALGORITHM_DEFAULTS["agrpo"].loss)
def agrpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    name = "agrpo"
    mask = counted_mask(batch, est)
    logp = require(est, "logp", mask.shape, name)
    weight = require(est, "token_weight", mask.shape, name).detach().to(logp.dtype)
    old = require(est, "old_logp", mask.shape, name) if est.old_logp is not None else logp.detach()
    mask = mask & (weight > 0)
    adv = token_advantages(batch.advantages.detach(), mask.shape).to(logp.dtype)
    log_ratio = safe(logp - old.detach(), mask)
    if config.ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-config.ratio_clamp, config.ratio_clamp)
    ratio = torch.exp(log_ratio)
    norm = normalizer_of(batch, mask, config)
    pg = safe(clipped_surrogate(ratio, adv, config.clip_eps_low, config.eps_high) * weight, mask)
    pg_loss = aggregate(pg, mask, config.loss_agg, norm, step_ids=batch.step_ids)
    kl_loss, kl = None, None
    if config.beta != 0:
        target = require(est, "ref_logp", mask.shape, name) if config.kl_reference == "ref" else old
        kl = safe(kl_penalty(logp, target.detach(), config.kl_estimator, config.kl_clamp,
                             config.kl_log_ratio_clamp), mask)
        kl_loss = config.beta * aggregate(safe(kl * ratio * weight, mask), mask, config.loss_agg, norm,
                                          step_ids=batch.step_ids)
    metrics = common_metrics(batch, est, mask, batch.advantages)
    metrics.update(ratio_metrics(ratio, adv, mask, config))
    metrics["step_weight_mean"] = masked_stats(weight, mask)[0]
    if kl is not None:
        metrics["kl"] = masked_stats(kl, mask)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": kl_loss}, metrics)
