"""Token-level clipped policy losses along one family: diffu-GRPO, coupled-GRPO, random-mask GRPO (UniGRPO),
TraceRL and CJ-GRPO differ only in which estimator produced the per-token log-probs, their defaults and (CJ-GRPO)
the aggregation over decoding steps. Plus the plain policy gradient, the reference they reduce to on-policy.

Per counted token: rho = exp(clamp(logp - old_logp)), l = -min(rho A, clip(rho, 1 - low, 1 + high) A)
+ beta * KL(pi || ref or old); then `loss_agg` (see core). A value model's loss is the learner's (rl.value).
"""
from __future__ import annotations

from functools import partial

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
    kl_term,
    masked_stats,
    normalizer_of,
    ratio_metrics,
    require,
    safe,
    token_advantages,
)
from rl.published import ALGORITHM_DEFAULTS


def token_ppo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig,
                   name: str = "token_ppo") -> tuple[torch.Tensor, Metrics]:
    mask = counted_mask(batch, est)
    logp = require(est, "logp", mask.shape, name)
    old = require(est, "old_logp", mask.shape, name) if est.old_logp is not None else logp
    adv = token_advantages(batch.advantages.detach(), mask.shape).to(logp.dtype)
    ratio = importance_ratio(safe(logp - old.detach(), mask), config)
    pg = safe(clipped_surrogate(ratio, adv, config.clip_eps_low, config.eps_high), mask)

    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(pg, mask, config.loss_agg, norm, step_ids=batch.step_ids)
    kl = kl_term(est, mask, config, name)
    kl_loss = config.beta * aggregate(kl, mask, config.loss_agg, norm, step_ids=batch.step_ids) \
        if kl is not None else None

    metrics = common_metrics(batch, est, mask, batch.advantages)
    metrics.update(ratio_metrics(ratio, adv, mask, config))
    if kl is not None:
        metrics["kl"] = masked_stats(kl, mask)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": kl_loss}, metrics)


def policy_gradient_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig,
                         name: str = "policy_gradient") -> tuple[torch.Tensor, Metrics]:
    """Plain -A * logp (+ beta KL), the gradient every clipped loss has at its first on-policy step."""
    mask = counted_mask(batch, est)
    logp = require(est, "logp", mask.shape, name)
    adv = token_advantages(batch.advantages.detach(), mask.shape).to(logp.dtype)
    norm = normalizer_of(batch, mask, config)
    pg_loss = aggregate(safe(-adv * logp, mask), mask, config.loss_agg, norm, step_ids=batch.step_ids)
    kl = kl_term(est, mask, config, name)
    kl_loss = config.beta * aggregate(kl, mask, config.loss_agg, norm, step_ids=batch.step_ids) \
        if kl is not None else None
    metrics = common_metrics(batch, est, mask, batch.advantages)
    if kl is not None:
        metrics["kl"] = masked_stats(kl, mask)[0]
    return finish({"pg_loss": pg_loss, "kl_loss": kl_loss}, metrics)


LOSSES.register("policy_gradient")(policy_gradient_loss)
LOSSES.register("token_ppo")(token_ppo_loss)
# The token-level clipped losses differ in their estimator and their defaults (rl/published.py): d1 (one-step),
# DiffuCoder (coupled), UniGRPO-style random masking (the tokens the estimator masked: estimates.observed_mask),
# TraceRL (trajectory; clamped ratio, KL to the old policy), CJ-GRPO (trajectory; every token unmasked at a step,
# pooled per step).
for _name in ("diffu_grpo", "coupled_grpo", "random_mask_grpo", "tracerl", "cj_grpo"):
    LOSSES.register(_name, **ALGORITHM_DEFAULTS[_name].loss)(partial(token_ppo_loss, name=_name))
