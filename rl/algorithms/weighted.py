"""wd1: ratio-free weighted likelihood, L = -sum_i softmax(A)_i log pi(o_i) + sum_i softmax(-A)_i log pi(o_i).

The signed weights w_i = softmax_g(psi A)_i - softmax_g(-psi A)_i come from `rl.advantages.wd1_weights`, computed
once over the whole batch and passed as `batch.advantages` (so micro-batch splits are exact). log pi(o_i) is the
one-step estimator's token log-probs, aggregated by `loss_agg` (default: token mean per sequence, mean over
sequences), optional beta * KL per token.
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
    kl_term,
    masked_stats,
    normalizer_of,
    require,
    safe,
    token_advantages,
)


@LOSSES.register("wd1", beta=0.0, loss_agg="seq_mean_token_mean")
def wd1_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    name = "wd1"
    mask = counted_mask(batch, est)
    logp = require(est, "logp", mask.shape, name)
    w = token_advantages(batch.advantages.detach(), mask.shape).to(logp.dtype)
    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(safe(-w * logp, mask), mask, config.loss_agg, norm, step_ids=batch.step_ids)
    kl = kl_term(est, mask, config, name)
    kl_loss = config.beta * aggregate(kl, mask, config.loss_agg, norm, step_ids=batch.step_ids) \
        if kl is not None else None
    metrics = common_metrics(batch, est, mask, batch.advantages)
    metrics["logp_mean"] = masked_stats(logp, mask)[0]
    if kl is not None:
        metrics["kl"] = masked_stats(kl, mask)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": kl_loss, "value_loss": None}, metrics)
