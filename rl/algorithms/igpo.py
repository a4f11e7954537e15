"""IGPO (arXiv 2509.10396; facebookresearch/igpo): GRPO whose zero-advantage groups get inpainted hints.

The loss is d1's token-level clipped objective on the one-step estimator (the released run: every completion
position masked in the scoring forward, prompt never masked), l = -min(rho A, clip(rho, 1 - 0.2, 1 + 0.2) A)
+ 0.01 k3 KL to the reference, summed over the batch's counted tokens / their number, A = R - group mean. What is
IGPO's own lives elsewhere: which groups get hints and where (rl/inpainting.py, launch/igpo.py), pre-filled
positions in the engine (rollout GenerationRequest.prefill), and the learner never counting a pre-filled token
(rl.estimators.base.token_mask_of: Trajectory.prefilled), so hints are never trained on as the policy's choice.

Option `sequence_ratio` (the released run's use_gspo=true, GSPO, Zheng et al. 2025): one ratio per sequence,

    s_i = exp( sum_{j < L_i} (logp_ij - old_ij) / L_i ),   L_i the generation length,

over EVERY response position, pre-filled hints included (`sequence_ratio: response`: trainer_igpo.py sums
per_token_logps over all logits_to_keep positions and divides by logits_to_keep, whatever its token mask keeps, so
the hints' log-probs do get gradient through s_i), clipped at the sequence level, broadcast onto the sequence's
counted tokens: l_ij = -min(s_i A_i, clip(s_i) A_i) + beta k3_ij, the same token mean. `sequence_ratio: counted`
takes the mean over the counted tokens only (hints never enter: issue 15's rule kept under GSPO). The shared
sequence-level loss (rl.algorithms.sequence) does the clip, with a per-token KL.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from rl.algorithms.core import LOSSES, LossConfig, Metrics, PolicyBatch, PolicyEstimates, counted_mask, require, safe
from rl.algorithms.ppo import token_ppo_loss
from rl.algorithms.sequence import sequence_clipped_loss
from rl.published import ALGORITHM_DEFAULTS


def masked_sums(logp: torch.Tensor, old: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j logp_ij over `where` and the same of old (detached): GSPO's sequence log-likelihoods."""
    return safe(logp, where).sum(1), safe(old.detach(), where).sum(1)


@LOSSES.register("igpo", **ALGORITHM_DEFAULTS["igpo"].loss)
def igpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    if config.sequence_ratio == "off":
        return token_ppo_loss(batch, est, config, name="igpo")
    mask = counted_mask(batch, est)
    logp = require(est, "logp", mask.shape, "igpo")
    old = require(est, "old_logp", mask.shape, "igpo") if est.old_logp is not None else logp
    if config.sequence_ratio == "response":  # every response position / the generation length (logits_to_keep)
        lengths = require(batch, "lengths", (mask.shape[0],), "igpo")
        where = torch.arange(mask.shape[1], device=logp.device)[None, :] < lengths.to(logp.device)[:, None]
        seq_config = replace(config, seq_length="generation", length_normalize=True)
    else:  # "counted": the counted tokens / their number
        where = mask
        seq_config = replace(config, seq_length="valid", length_normalize=True)
        batch = replace(batch, token_mask=mask)  # seq_length "valid" counts batch.token_mask
    seq, seq_old = masked_sums(logp, old, where)
    return sequence_clipped_loss(batch, replace(est, seq_logp=seq, seq_old_logp=seq_old), seq_config, "igpo",
                                 kl_fn=None)
