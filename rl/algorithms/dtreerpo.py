"""d-TreeRPO (THU-BPM/d-TreeRPO, arXiv 2512.09675): the clipped token loss on the edges of a rollout tree, plus its
time-scheduled self-distillation term.

The learner samples are launch/driver_tree.py's: one per tree edge, scored by estimator `intermediate_state` (the
tokens unmasked between the parent and the child state, through the child's first EOS, from one forward of the
parent state), each with the child node's local advantage (rl/tree.py). Per edge: the mean over its scored tokens
of -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3(pi || ref); the mean over edges (`seq_mean_token_mean`),
as dtreerpo_trainer.compute_loss.

Self-distillation (dtreerpo_trainer.compute_loss, enable_self_distillation_loss; published: lambda_max 3e-3,
gamma 2, tau_max 2, beta 0.7, T = max_steps 30000). At optimizer step t (the trainer's global_step):
    lambda(t) = lambda_max (e^{gamma t/T} - 1) / (e^gamma - 1),   tau(t) = max(tau_max (1 - t/T)^beta, 1e-6).
Siblings (the edges out of one parent node, `ScoredSample.sibling_group`) with a positive local advantage weigh
w_k = softmax_k(A_k / tau(t)); a group of one edge is skipped. At each position j where some positive sibling
decoded a token (its scored tokens), the target is q_j(v) = sum_{k active at j, y_kj = v} w_k / W_j,
W_j = sum_{k active at j} w_k, and the term is KL(q_j || p_theta(. | parent state)_j) =
sum_v q_j(v) (log(q_j(v) + 1e-8) - log p_theta(v | parent)_j). The loss adds lambda(t) x the mean of these terms
over the (group, position) pairs. (The reference also adds its 1e-8 to W_j: a relative change below 1e-6 at the
smallest weights, left out so that the shares of a pair sum to exactly 1.) Every sibling's edge is scored from the
same parent state, so log p_theta(y_kj | parent)_j is the edge's own token log-prob (estimates.logp): with
c_kj = w_k / W_j the term is sum_k c_kj (log(q_j(y_kj) + 1e-8) - logp_kj), linear in the edges' log-probs, and the
pairs of a batch number sum_kj c_kj. So siblings need not share a micro-batch: the learner computes
(c, log q) over the whole batch at each optimizer step (`distill_terms`), and each micro-batch adds its tokens'
share over the minibatch's global sum of c (`DistillTerms.normalizer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rl.algorithms.core import LOSSES, LossConfig, Metrics, PolicyBatch, PolicyEstimates, counted_mask, safe
from rl.algorithms.ppo import token_ppo_loss
from rl.published import ALGORITHM_DEFAULTS

EPS = 1e-8  # the reference's eps in log q


@dataclass
class DistillTerms:
    """One micro-batch's self-distillation inputs (module doc): per token c_kj and log(q_j(y_kj) + eps)."""

    coef: torch.Tensor  # (B, L) c_kj (0 where the token is not a positive sibling's active token)
    log_q: torch.Tensor  # (B, L)
    lam: float  # lambda(t)
    normalizer: float | torch.Tensor  # sum of c over the minibatch (every micro-batch, every rank): the pair count


def distill_schedule(t: int, config: LossConfig) -> tuple[float, float]:
    """(lambda(t), tau(t)) at optimizer step t (module doc)."""
    progress = min(1.0, max(0.0, t / max(1, config.distill_total_steps)))
    g = config.distill_gamma
    lam = config.distill_lambda_max * (math.exp(g * progress) - 1.0) / (math.exp(g) - 1.0)
    tau = max(config.distill_tau_max * max(0.0, 1.0 - progress) ** config.distill_beta, 1e-6)
    return lam, tau


def distill_terms(groups: list[str | None], advantages: list[float], tokens: list[torch.Tensor],
                  active: list[torch.Tensor], tau: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample, (c, log q) rows over its tokens (module doc): groups[k] the sample's sibling group (None: not an
    edge), tokens[k] its response ids, active[k] its scored (trained) tokens."""
    coef = [torch.zeros(t.numel(), dtype=torch.float64) for t in tokens]
    log_q = [torch.zeros(t.numel(), dtype=torch.float64) for t in tokens]
    members: dict[str, list[int]] = {}
    for k, g in enumerate(groups):
        if g is not None:
            members.setdefault(g, []).append(k)
    for idx in members.values():
        if len(idx) <= 1:
            continue
        pos = [k for k in idx if advantages[k] > 0]
        if not pos:
            continue
        w = torch.softmax(torch.tensor([advantages[k] for k in pos], dtype=torch.float64) / tau, dim=0)
        width = max(tokens[k].numel() for k in pos)
        act = torch.zeros((len(pos), width), dtype=torch.bool)
        tok = torch.full((len(pos), width), -1, dtype=torch.long)
        for r, k in enumerate(pos):
            n = tokens[k].numel()
            act[r, :n], tok[r, :n] = active[k].bool().cpu(), tokens[k].long().cpu()
        total = (w[:, None] * act).sum(0)  # W_j
        c = torch.where(act, w[:, None] / total.clamp(min=torch.finfo(torch.float64).tiny)[None, :],
                        torch.zeros((), dtype=torch.float64))
        same = (tok[:, None, :] == tok[None, :, :]) & act[:, None, :] & act[None, :, :]  # (K, K, L)
        q = (same * c[None, :, :]).sum(1)  # q_j(y_kj) for each active (k, j)
        for r, k in enumerate(pos):
            n = tokens[k].numel()
            coef[k] = c[r, :n].clone()
            log_q[k] = torch.where(act[r, :n], torch.log(q[r, :n] + EPS), torch.zeros((), dtype=torch.float64))
    return coef, log_q


def dtreerpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    loss, metrics = token_ppo_loss(batch, est, config, name="dtreerpo")
    sd = batch.distill
    if sd is None:
        return loss, metrics
    mask = counted_mask(batch, est)
    if sd.coef.shape != mask.shape or sd.log_q.shape != mask.shape:
        raise ValueError(f"batch.distill shapes {tuple(sd.coef.shape)}, {tuple(sd.log_q.shape)} != {tuple(mask.shape)}")
    logp = est.logp
    coef = safe(sd.coef.to(logp.dtype), mask)
    per_token = coef * (sd.log_q.to(logp.dtype) - logp)
    distill = safe(per_token, mask).sum() / torch.as_tensor(sd.normalizer, dtype=logp.dtype).clamp(min=EPS)
    metrics["distill_loss"] = distill.detach()
    metrics["distill_lambda"] = torch.tensor(float(sd.lam), dtype=torch.float64)
    metrics["loss"] = (loss + sd.lam * distill).detach()
    return loss + sd.lam * distill, metrics


LOSSES.register("dtreerpo", **ALGORITHM_DEFAULTS["dtreerpo"].loss)(dtreerpo_loss)
