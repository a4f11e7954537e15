"""EBPO (ELBO-based Block-level Policy Optimization, LLaDA2.1, arXiv 2602.08676) for block-diffusion models.

The sequence log-ratio is assembled from block-level ELBO contributions: at each sampled timestep t_n every block b
is noised and scored given the clean earlier blocks (block-causal attention, all blocks in one forward: the
`block_elbo` estimator's [noisy | clean] layout), and

    log rho_i = sum_n w_n sum_b [log p_theta(y_i^b | z_{t_n}, y_i^{<b}) - log p_old(y_i^b | z_{t_n}, y_i^{<b})]
              = ELBO^block_theta(y_i) - ELBO^block_old(y_i)
    l_i = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)          mean over sequences

(no per-token normalisation, as the paper writes the ratio; `length_normalize` is the option that divides by L).
The timesteps are shared by all blocks of a forward (the estimator's `share_t`, set by the recipe), stratified over
the Monte Carlo draws. `ratio_level="block"` is NOT implemented: the paper's ratio is one per sequence.
"""
from __future__ import annotations

import torch

from rl.algorithms.core import LOSSES, LossConfig, Metrics, PolicyBatch, PolicyEstimates
from rl.algorithms.espo import sequence_kl
from rl.algorithms.sequence import sequence_clipped_loss
from rl.published import ALGORITHM_DEFAULTS


@LOSSES.register("ebpo", **ALGORITHM_DEFAULTS["ebpo"].loss)
def ebpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    return sequence_clipped_loss(batch, est, config, "ebpo", kl_fn=sequence_kl)
