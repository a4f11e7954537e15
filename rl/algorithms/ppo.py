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
    kl_term,
    masked_stats,
    normalizer_of,
    ratio_metrics,
    require,
    safe,
    token_advantages,
)


def token_ppo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig,
                   name: str = "token_ppo") -> tuple[torch.Tensor, Metrics]:
    mask = counted_mask(batch, est)
    logp = require(est, "logp", mask.shape, name)
    old = require(est, "old_logp", mask.shape, name) if est.old_logp is not None else logp
    adv = token_advantages(batch.advantages.detach(), mask.shape).to(logp.dtype)
    log_ratio = safe(logp - old.detach(), mask)
    if config.ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-config.ratio_clamp, config.ratio_clamp)
    ratio = torch.exp(log_ratio)
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
# d1: one-step estimator; eps 0.5, beta 0.04 (k3 to the reference), |o_i|-normalised token sum.
LOSSES.register("diffu_grpo", clip_eps_low=0.5, beta=0.04, kl_reference="ref", kl_estimator="k3",
                loss_agg="token_mean")(partial(token_ppo_loss, name="diffu_grpo"))
# DiffuCoder: coupled estimator; eps 0.5, beta 0.01.
LOSSES.register("coupled_grpo", clip_eps_low=0.5, beta=0.01, kl_reference="ref", kl_estimator="k3",
                loss_agg="token_mean")(partial(token_ppo_loss, name="coupled_grpo"))
# UniGRPO / dLLM-RL random masking: loss on the tokens the estimator masked (estimates.observed_mask).
# eps 0.2, beta 0 are this project's defaults, not published figures.
LOSSES.register("random_mask_grpo", clip_eps_low=0.2, beta=0.0, loss_agg="token_mean")(
    partial(token_ppo_loss, name="random_mask_grpo"))
# TraceRL: trajectory estimator; rho = exp(clamp(., -10, 10)), eps 0.2, beta 0.01 k3 against the old policy with
# its exponent clamped to +-10 (dLLM-RL train_trado_policy.py).
LOSSES.register("tracerl", clip_eps_low=0.2, beta=0.01, kl_reference="old", kl_estimator="k3", ratio_clamp=10.0,
                kl_log_ratio_clamp=10.0, loss_agg="token_mean")(partial(token_ppo_loss, name="tracerl"))
# CJ-GRPO (yjyddq/EOSER-ASS-RL): every token unmasked at a step, EOS padding included, pooled across the batch per
# step, then the mean over steps; eps 0.5 / beta 0.04 (k3 to the reference) as its train.yaml.
LOSSES.register("cj_grpo", clip_eps_low=0.5, beta=0.04, kl_reference="ref", kl_estimator="k3",
                loss_agg="step_pooled_mean", token_set="response")(partial(token_ppo_loss, name="cj_grpo"))
