"""What every policy loss shares: the batch / estimate records, the config, aggregation, KL estimators, metrics.

A loss is `fn(batch: PolicyBatch, estimates: PolicyEstimates, config: LossConfig) -> (loss, metrics)`, registered
in `LOSSES` with its published defaults. Tensors only; no model, no Ray.

Aggregation (`loss_agg`) and the global normaliser. Each loss is `numerator / normalizer` where the numerator is a
sum over samples, so a batch split into micro-batches (or across workers) gives exactly the whole-batch loss and
gradient when every piece divides by the normaliser of the WHOLE batch:
    global = sum over all micro-batches (all workers) of loss_normalizer(mb.token_mask, loss_agg, ...)
and set `PolicyBatch.loss_normalizer = global` (divide by the world size when the data-parallel all-reduce
averages gradients). Without it a call normalises by its own batch.
  token_mean           sum_ij l_ij / total counted tokens
  seq_mean_token_sum   sum_ij l_ij / number of sequences
  seq_mean_token_mean  sum_i (sum_j l_ij / n_i) / number of sequences
  seq_mean_step_mean   sum_i mean_{steps s of i} (mean_{j in s} l_ij) / number of sequences  (CJ-GRPO; step_ids)
  fixed_length         sum_ij l_ij / (number of sequences * fixed_length)   (a constant per-sequence normaliser)
  step_pooled_mean     per decoding step s: sum over the call's tokens of step s / their number (pooled across
                       the samples of the call), then the mean over the steps present; the normaliser counts calls
                       (micro-batches), so a minibatch's loss is the mean over its micro-batches (CJ-GRPO's
                       reference pools per device batch; one micro-batch holding the batch pools the whole batch)
"Number of sequences" counts sequences with at least one counted token. Sequence-level losses (GDPO, SPG) are
broadcast onto their counted tokens first, so `seq_mean_token_mean` is a plain mean over sequences and
`token_mean` weights each sequence by its length.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from rl.registry import Registry

LOSSES = Registry("policy loss")

AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_step_mean", "fixed_length",
             "step_pooled_mean")
TOKEN_SETS = ("through_eos", "response")
SEQ_LENGTHS = ("generation", "valid")
LOGP_TEMPERATURES = ("raw", "rollout")
KL_ESTIMATORS = ("k1", "k2", "k3")
SEQUENCE_RATIOS = ("off", "response", "counted")

Metrics = dict[str, torch.Tensor]
LossFn = Callable[["PolicyBatch", "PolicyEstimates", "LossConfig"], tuple[torch.Tensor, Metrics]]


@dataclass
class PolicyBatch:
    """What the learner knows without running a model: the rollout and its advantages."""

    advantages: torch.Tensor  # (B,) per sample or (B, L) per token (value model); wd1: its signed weights
    token_mask: torch.Tensor  # (B, L) bool: tokens counted in the loss (response up to and including first EOS)
    step_ids: torch.Tensor | None = None  # (B, L) long: decoding step of each token (seq_mean_step_mean)
    lengths: torch.Tensor | None = None  # (B,): the generation length of each response (GDPO's L; the learner sets it)
    loss_normalizer: float | torch.Tensor | None = None  # denominator of the whole batch (see module doc)
    distill: Any = None  # d-TreeRPO: rl.algorithms.dtreerpo.DistillTerms of this micro-batch (the learner's)


@dataclass
class PolicyEstimates:
    """What the estimators computed: current (with grad), old and reference log-likelihoods of the same masks."""

    logp: torch.Tensor | None = None  # (B, L) current per-token log-probs
    old_logp: torch.Tensor | None = None  # (B, L) same under the policy that generated the batch (None: logp.detach())
    ref_logp: torch.Tensor | None = None  # (B, L) reference policy
    entropy: torch.Tensor | None = None  # (B, L) per-token entropy (metric only)
    observed_mask: torch.Tensor | None = None  # (B, L) bool: tokens the estimator scored (random-mask GRPO)
    seq_logp: torch.Tensor | None = None  # (B,) sequence log-likelihood estimate (ELBO), current
    seq_old_logp: torch.Tensor | None = None  # (B,)
    seq_ref_logp: torch.Tensor | None = None  # (B,)
    mc_logp: torch.Tensor | None = None  # (B, K, L) token log-probs in each of K masked forwards (SPG)
    mc_weights: torch.Tensor | None = None  # (B, K, L) MaskDraw.token_weights of those forwards (0 = not counted)
    # BGPO: the old policy's share of the ELBO from each of those K forwards (B, K), and how many forwards the whole
    # estimate has (K_total >= K when the learner backpropagates one draw at a time; None: K).
    mc_old_elbo: torch.Tensor | None = None
    mc_draws: int | None = None
    token_weight: torch.Tensor | None = None  # (B, L) per-token estimator weight (AGRPO's sampled steps)


@dataclass
class LossConfig:
    clip_eps_low: float = 0.2  # ratio clipped to [1 - low, 1 + high]
    clip_eps_high: float | None = None  # None: same as low
    ratio_clamp: float | None = None  # clamp of log(pi/pi_old) to [-c, c] before exp (TraceRL: 10)
    beta: float = 0.0  # KL coefficient
    kl_reference: str = "ref"  # "ref" | "old": the policy the KL penalty is measured against
    kl_estimator: str = "k3"  # k1: log(pi/t); k2: 0.5 log(pi/t)^2; k3: t/pi - log(t/pi) - 1
    kl_clamp: float | None = None  # clamp the per-token KL estimate to [-c, c]
    kl_log_ratio_clamp: float | None = None  # clamp log(target/pi) to [-c, c] inside k3's exp (TraceRL: 10)
    loss_agg: str = "token_mean"  # see AGG_MODES
    fixed_length: int | None = None  # per-sequence normaliser of loss_agg="fixed_length"
    length_normalize: bool = True  # GDPO: divide ELBO differences by L; SPG: per-token ELBO / EUBO
    # GDPO's L / SPG's ELBO divisor: "generation" = the response's decoded length (the fixed generation length,
    # GDPO's code), "valid" = its tokens through the first EOS. Never the draw-dependent count of masked tokens.
    seq_length: str = "generation"
    # Tokens a token-level loss trains: "through_eos" (d1, TraceRL, ...) or "response" = every decoded token,
    # EOS padding included (CJ-GRPO's reference trains every token unmasked at a step). Read by the learner.
    token_set: str = "through_eos"
    # Temperature of the learner's log-probs: "raw" logits (every reference) or the "rollout" temperature (the
    # sampling distribution itself: consistent with the rollout's recorded log-probs). Read by the learner.
    logp_temperature: str = "raw"
    # Count only the tokens the estimator scored (estimates.observed_mask): token-level losses. Sequence-level
    # losses (GDPO, SPG) set False: their sequences count their tokens through EOS whatever the draw masked.
    observed_only: bool = True
    beta_e: float = 1.5  # SPG EUBO exponent beta_E
    mix: float = 0.5  # SPG, A <= 0: mix * EUBO + (1 - mix) * ELBO (1: pure EUBO, 0: ELBO)
    # The learner runs forward + backward one Monte Carlo draw at a time (BGPO: a loss linear in the draws, so the
    # gradients accumulate exactly with one draw's graph alive). Read by the learner.
    per_draw_backward: bool = False
    # IGPO: share of a sample's pre-filled hint tokens trained on after all, those of highest entropy under the old
    # policy (its code: 0.2); 0 = hints never counted. Read by the learner (rl.inpainting.thaw_high_entropy).
    hint_entropy_keep: float = 0.0
    # IGPO's GSPO option (rl/algorithms/igpo.py): "off" = d1's token-level ratio; "response" = one ratio per
    # sequence, exp(sum over every response position, hints included, of (logp - old_logp) / generation length),
    # the released run's use_gspo; "counted" = the same over the counted tokens only / their number (hints never
    # enter the ratio). Clipped per sequence, broadcast onto the counted tokens; the KL stays per token.
    sequence_ratio: str = "off"
    # d-TreeRPO's self-distillation (rl/algorithms/dtreerpo.py): lambda(t) = lambda_max (e^{gamma t/T} - 1) /
    # (e^gamma - 1), tau(t) = tau_max (1 - t/T)^beta, T = distill_total_steps; lambda_max 0 = off. Read by the
    # learner (it builds the per-token terms at each optimizer step) and the dtreerpo loss.
    distill_lambda_max: float = 0.0
    distill_gamma: float = 2.0
    distill_tau_max: float = 2.0
    distill_beta: float = 0.7
    distill_total_steps: int = 30000

    def __post_init__(self) -> None:
        checks = {"loss_agg": AGG_MODES, "kl_estimator": KL_ESTIMATORS, "kl_reference": ("ref", "old"),
                  "token_set": TOKEN_SETS, "seq_length": SEQ_LENGTHS, "logp_temperature": LOGP_TEMPERATURES,
                  "sequence_ratio": SEQUENCE_RATIOS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"loss config: {name}={getattr(self, name)!r} not in {allowed}")
        if self.loss_agg == "fixed_length" and not (self.fixed_length and self.fixed_length > 0):
            raise ValueError("loss config: loss_agg='fixed_length' needs fixed_length > 0")
        if not 0.0 <= self.mix <= 1.0 or self.beta_e <= 0:
            raise ValueError(f"loss config: need 0 <= mix <= 1 and beta_e > 0, got mix={self.mix}, beta_e={self.beta_e}")
        if not 0.0 <= self.hint_entropy_keep <= 1.0:
            raise ValueError(f"loss config: hint_entropy_keep must be in [0, 1], got {self.hint_entropy_keep}")
        if (self.distill_lambda_max < 0 or self.distill_tau_max <= 0 or self.distill_total_steps < 1
                or self.distill_gamma == 0 or self.distill_beta < 0):
            raise ValueError("loss config: need distill_lambda_max >= 0, distill_tau_max > 0, distill_total_steps >= 1, "
                             f"distill_gamma != 0, distill_beta >= 0; got {self.distill_lambda_max}, "
                             f"{self.distill_tau_max}, {self.distill_total_steps}, {self.distill_gamma}, "
                             f"{self.distill_beta}")
        if self.clip_eps_low < 0 or (self.clip_eps_high is not None and self.clip_eps_high < 0):
            raise ValueError("loss config: clip_eps_low / clip_eps_high must be >= 0")

    @property
    def eps_high(self) -> float:
        return self.clip_eps_low if self.clip_eps_high is None else self.clip_eps_high


def make_loss_config(name: str, **overrides: Any) -> LossConfig:
    """LossConfig with loss `name`'s published defaults, then `overrides` (unknown keys fail, naming the key)."""
    known = {f.name for f in fields(LossConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"loss config: unknown option '{key}' for loss '{name}'")
    return replace(LossConfig(), **{**LOSSES.defaults(name), **overrides})


def compute_loss(name: str, batch: PolicyBatch, estimates: PolicyEstimates,
                 config: LossConfig | None = None) -> tuple[torch.Tensor, Metrics]:
    return LOSSES.get(name)(batch, estimates, config if config is not None else make_loss_config(name))


# ----------------------------------------------------------------------------------------------- aggregation
def loss_normalizer(token_mask: torch.Tensor, loss_agg: str, *, fixed_length: int | None = None) -> torch.Tensor:
    """This batch's additive share of the normaliser (sum it over micro-batches / workers for the global one)."""
    mask = token_mask.bool()
    if loss_agg == "token_mean":
        return mask.sum().double()
    if loss_agg == "step_pooled_mean":
        return mask.any().double()  # one per call (micro-batch) with counted tokens
    seqs = (mask.sum(1) > 0).sum().double()
    if loss_agg == "fixed_length":
        if not fixed_length:
            raise ValueError("loss_normalizer: loss_agg='fixed_length' needs fixed_length")
        return seqs * fixed_length
    if loss_agg not in AGG_MODES:
        raise ValueError(f"loss_normalizer: unknown loss_agg '{loss_agg}'")
    return seqs


def aggregate_numerator(per_token: torch.Tensor, token_mask: torch.Tensor, loss_agg: str,
                        step_ids: torch.Tensor | None = None) -> torch.Tensor:
    mask = token_mask.bool()
    x = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if loss_agg in ("token_mean", "seq_mean_token_sum", "fixed_length"):
        return x.sum()
    if loss_agg == "seq_mean_token_mean":
        return (x.sum(1) / mask.sum(1).clamp(min=1)).sum()
    if loss_agg == "seq_mean_step_mean":
        if step_ids is None:
            raise ValueError("loss_agg='seq_mean_step_mean' needs batch.step_ids")
        if step_ids.shape != mask.shape:
            raise ValueError(f"batch.step_ids shape {tuple(step_ids.shape)} != token_mask {tuple(mask.shape)}")
        steps = int(step_ids[mask].max()) + 1 if bool(mask.any()) else 0
        col = torch.where(mask, step_ids.long(), torch.full_like(step_ids, steps, dtype=torch.long))
        sums = x.new_zeros(x.shape[0], steps + 1).scatter_add_(1, col, x)[:, :steps]
        counts = x.new_zeros(x.shape[0], steps + 1).scatter_add_(1, col, mask.to(x.dtype))[:, :steps]
        step_mean = sums / counts.clamp(min=1)
        return (step_mean.sum(1) / (counts > 0).sum(1).clamp(min=1)).sum()
    if loss_agg == "step_pooled_mean":
        if step_ids is None:
            raise ValueError("loss_agg='step_pooled_mean' needs batch.step_ids")
        if step_ids.shape != mask.shape:
            raise ValueError(f"batch.step_ids shape {tuple(step_ids.shape)} != token_mask {tuple(mask.shape)}")
        steps = int(step_ids[mask].max()) + 1 if bool(mask.any()) else 0
        col = torch.where(mask, step_ids.long(), torch.full_like(step_ids, steps, dtype=torch.long)).reshape(-1)
        sums = x.new_zeros(steps + 1).scatter_add_(0, col, x.reshape(-1))[:steps]
        counts = x.new_zeros(steps + 1).scatter_add_(0, col, mask.to(x.dtype).reshape(-1))[:steps]
        present = counts > 0
        return (sums[present] / counts[present]).sum() / present.sum().clamp(min=1)
    raise ValueError(f"unknown loss_agg '{loss_agg}'; known: {', '.join(AGG_MODES)}")


def aggregate(per_token: torch.Tensor, token_mask: torch.Tensor, loss_agg: str,
              normalizer: float | torch.Tensor | None = None, *, step_ids: torch.Tensor | None = None,
              fixed_length: int | None = None) -> torch.Tensor:
    num = aggregate_numerator(per_token, token_mask, loss_agg, step_ids)
    if normalizer is None:
        normalizer = loss_normalizer(token_mask, loss_agg, fixed_length=fixed_length)
    return num / torch.as_tensor(normalizer, dtype=num.dtype, device=num.device).clamp(min=1e-8)


def normalizer_of(batch: PolicyBatch, mask: torch.Tensor, config: LossConfig) -> torch.Tensor:
    if batch.loss_normalizer is not None:
        return torch.as_tensor(batch.loss_normalizer, dtype=torch.float64)
    return loss_normalizer(mask, config.loss_agg, fixed_length=config.fixed_length)


# ----------------------------------------------------------------------------------------------- pieces
def kl_penalty(logp: torch.Tensor, target_logp: torch.Tensor, estimator: str = "k3",
               clamp: float | None = None, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || target) from samples of pi: k1 = log(pi/t), k2 = 0.5 log(pi/t)^2,
    k3 = t/pi - log(t/pi) - 1 (>= 0, unbiased, low variance). log_ratio_clamp c: k3's exponent log(t/pi) is
    clamped to [-c, c] inside exp only (TraceRL's code: exp(clamp(d)) - 1 - d)."""
    d = target_logp - logp
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d ** 2
    elif estimator == "k3":
        e = d.clamp(-log_ratio_clamp, log_ratio_clamp) if log_ratio_clamp is not None else d
        kl = torch.exp(e) - d - 1
    else:
        raise ValueError(f"unknown kl_estimator '{estimator}'; known: {', '.join(KL_ESTIMATORS)}")
    return kl.clamp(-clamp, clamp) if clamp is not None else kl


def importance_ratio(log_ratio: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """exp(log_ratio), the log-ratio first clamped to [-ratio_clamp, ratio_clamp] when the config sets one."""
    if config.ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-config.ratio_clamp, config.ratio_clamp)
    return torch.exp(log_ratio)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """-min(rho A, clip(rho, 1 - low, 1 + high) A), elementwise."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))


def token_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages[:, None].expand(shape)
    if advantages.shape == shape:
        return advantages
    raise ValueError(f"batch.advantages shape {tuple(advantages.shape)} is neither ({shape[0]},) nor {tuple(shape)}")


def counted_mask(batch: PolicyBatch, est: PolicyEstimates, observed_only: bool = True) -> torch.Tensor:
    mask = batch.token_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"batch.token_mask must be (B, L), got shape {tuple(mask.shape)}")
    if observed_only and est.observed_mask is not None:
        if est.observed_mask.shape != mask.shape:
            raise ValueError(f"estimates.observed_mask shape {tuple(est.observed_mask.shape)} != "
                             f"token_mask {tuple(mask.shape)}")
        mask = mask & est.observed_mask.bool()
    return mask


def require(obj: Any, name: str, shape: tuple[int, ...] | torch.Size | None, loss: str) -> torch.Tensor:
    value = getattr(obj, name)
    where = "batch" if isinstance(obj, PolicyBatch) else "estimates"
    if value is None:
        raise ValueError(f"loss '{loss}' needs {where}.{name}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}.{name} shape {tuple(value.shape)} != {tuple(shape)}")
    return value


def safe(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, 0 elsewhere (so padding never turns into NaN through 0 * inf)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def kl_term(est: PolicyEstimates, mask: torch.Tensor, config: LossConfig, loss: str) -> torch.Tensor | None:
    """Per-token beta-free KL penalty against ref or old, or None when beta == 0."""
    if config.beta == 0:
        return None
    logp = require(est, "logp", mask.shape, loss)
    if config.kl_reference == "ref":
        target = require(est, "ref_logp", mask.shape, loss)
    else:
        target = est.old_logp if est.old_logp is not None else logp.detach()
    return safe(kl_penalty(logp, target.detach(), config.kl_estimator, config.kl_clamp, config.kl_log_ratio_clamp),
                mask)


# ----------------------------------------------------------------------------------------------- metrics
def masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, max, min) of x over mask (population std); zeros when the mask is empty."""
    x = x.detach().double()
    mask = mask.bool()
    n = mask.sum()
    if int(n) == 0:
        z = torch.zeros((), dtype=torch.float64, device=x.device)
        return z, z, z, z
    vals = x[mask]
    return vals.mean(), vals.std(unbiased=False), vals.max(), vals.min()


def common_metrics(batch: PolicyBatch, est: PolicyEstimates, mask: torch.Tensor, adv: torch.Tensor | None
                   ) -> Metrics:
    """Advantage stats, entropy and token counts. (The rollout-vs-learner log-prob gap is the learner's
    `logp_mismatch`, measured once per update on the old pass: rl.learner_batch.logp_gaps.)"""
    out: Metrics = {"num_tokens": mask.sum().double(), "num_seqs": (mask.sum(1) > 0).sum().double()}
    if adv is not None:
        rows = mask.any(1)
        if adv.dim() == 1:
            out["adv_mean"], out["adv_std"], out["adv_max"], out["adv_min"] = masked_stats(adv, rows)
        else:
            out["adv_mean"], out["adv_std"], out["adv_max"], out["adv_min"] = masked_stats(adv, mask)
        out["adv_abs_mean"] = masked_stats(adv.abs(), rows if adv.dim() == 1 else mask)[0]
    if est.entropy is not None:
        out["entropy"] = masked_stats(est.entropy, mask)[0]
    return out


def ratio_metrics(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, config: LossConfig) -> Metrics:
    ratio, adv = ratio.detach().double(), adv.detach()
    low = (adv < 0) & (ratio < 1 - config.clip_eps_low)
    high = (adv > 0) & (ratio > 1 + config.eps_high)
    n = mask.sum().clamp(min=1).double()
    mean, _, mx, mn = masked_stats(ratio, mask)
    log_ratio = ratio.clamp(min=1e-30).log()
    approx_kl = masked_stats(ratio - 1 - log_ratio, mask)[0]  # k3 estimate of KL(old || current)
    return {"clipfrac_low": (low & mask).sum() / n, "clipfrac_high": (high & mask).sum() / n,
            "clipfrac": ((low | high) & mask).sum() / n, "ratio_mean": mean, "ratio_max": mx, "ratio_min": mn,
            "approx_kl": approx_kl}


def finish(parts: dict[str, torch.Tensor | None], metrics: Metrics) -> tuple[torch.Tensor, Metrics]:
    """Sum the present loss parts ("pg_loss", "kl_loss"); log each, detached. (A value model's loss is added by
    the learner: rl.value.value_loss.)"""
    present = [v for v in parts.values() if v is not None]
    loss = present[0]
    for part in present[1:]:
        loss = loss + part
    for name, part in parts.items():
        metrics[name] = part.detach() if part is not None else torch.zeros((), dtype=torch.float64)
    metrics["loss"] = loss.detach()
    return loss, {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
