"""wd1: ratio-free weighted likelihood, L = -sum_i softmax(A)_i log pi(o_i) + sum_i softmax(-A)_i log pi(o_i).

The signed weights w_i = softmax_g(psi A)_i - softmax_g(-psi A)_i come from `rl.advantages.wd1_weights`, computed
once over the whole batch and passed as `batch.advantages` (so micro-batch splits are exact). log pi(o_i) is the
one-step estimator's token log-probs summed over each sequence's tokens through the first EOS, as the paper and
its code (xiaohangt/wd1) do; `loss_agg` default seq_mean_token_sum = that sum, mean over sequences (the weights
carry the group size, so this is the mean over groups of the paper's group sum). Optional beta * KL per token.
"""
from __future__ import annotations

import torch

from rl.algorithms.core import (
    LOSSES,
    LossConfig,
    Metrics,
    PolicyBatch,
    PolicyEstimates,
    counted_mask,
    masked_stats,
    require,
)
from rl.algorithms.ppo import policy_gradient_loss
from rl.published import ALGORITHM_DEFAULTS


@LOSSES.register("wd1", **ALGORITHM_DEFAULTS["wd1"].loss)
def wd1_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    # With the signed weights in place of advantages, wd1 is exactly the plain -A * logp (+ beta KL) objective.
    loss, metrics = policy_gradient_loss(batch, est, config, name="wd1")
    mask = counted_mask(batch, est)
    metrics["logp_mean"] = masked_stats(require(est, "logp", mask.shape, "wd1"), mask)[0].detach()
    return loss, metrics
