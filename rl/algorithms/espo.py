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
    kl_penalty,
)
from rl.algorithms.sequence import sequence_clipped_loss
from rl.published import ALGORITHM_DEFAULTS


def sequence_kl(seq: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, estimator: str) -> torch.Tensor:
    """ESPO's sequence KL: k2 = 0.5 (ELBO - ELBO_target)^2 / L; k1 / k3 on the length-normalised ELBOs."""
    if estimator == "k2":
        return 0.5 * (seq - target) ** 2 / scale
    return kl_penalty(seq / scale, target / scale, estimator)


@LOSSES.register("espo", **ALGORITHM_DEFAULTS["espo"].loss)
def espo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    return sequence_clipped_loss(batch, est, config, "espo", kl_fn=sequence_kl)
