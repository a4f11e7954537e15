"""DPO over preference pairs on diffusion likelihood estimates: VRPO (LLaDA 1.5) and dTRPO.

Both minimise, over pairs (y_w chosen, y_l rejected) of one prompt,
    l = -log sigmoid(beta * [(B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l))])
and differ in the log-likelihood estimate B:
- VRPO (arXiv 2505.19223, eq. DPO-E): B is an ELBO estimate with budget n = n_t timesteps x n_yt masks, allocated
  n_t = n, n_yt = 1 (the `mc_elbo` estimator with num_samples = n: one mask per timestep), and ANTITHETIC sampling:
  the policy's and the reference's ELBO of one response use the same timesteps and masks (the estimators draw them
  from the sample's own generator, so both passes of a sample share them; rl.preference_learner checks it).
- dTRPO (arXiv 2603.18806): B is the trajectory log-likelihood of the rollout that produced the response,
  estimated from one forward of its re-masked final state (`remasked_step` estimator): the log-ratio to the
  reference is then the ratio over the newly unmasked tokens of one drawn step per block, weighted by the block's
  step count (the same on both sides).

Layout: rows come in pairs, row 2i the chosen response and row 2i+1 the rejected one of pair i;
`batch.advantages` marks them +1 / -1 (checked, so a shuffled or split pair fails loudly instead of training on the
wrong margin). `config.beta` is DPO's beta here (not a KL coefficient). The loss is the mean over pairs: numerator
summed over this call's pairs, divided by `batch.loss_normalizer` (the number of pairs of the whole minibatch) when
given, else by this call's pairs. There is no ratio to an old policy and so nothing to clip: the implicit reward
beta * (B_theta - B_ref) plays that role against the frozen reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rl.algorithms.core import (
    LOSSES,
    LossConfig,
    Metrics,
    PolicyBatch,
    PolicyEstimates,
    finish,
    require,
)
from rl.published import ALGORITHM_DEFAULTS

__all__ = ["dpo_loss", "pair_rows"]


def pair_rows(batch: PolicyBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows, rejected rows) of a pair-laid batch; one-line error when the layout is not (+1, -1) pairs."""
    adv = batch.advantages
    if adv is None or adv.dim() != 1:
        raise ValueError(f"loss '{name}' needs batch.advantages (B,) marking chosen (+1) / rejected (-1) rows")
    b = adv.shape[0]
    if b % 2:
        raise ValueError(f"loss '{name}': {b} rows is not a whole number of (chosen, rejected) pairs")
    chosen, rejected = torch.arange(0, b, 2, device=adv.device), torch.arange(1, b, 2, device=adv.device)
    if not (bool((adv[chosen] == 1).all()) and bool((adv[rejected] == -1).all())):
        raise ValueError(f"loss '{name}': rows must alternate chosen (+1) / rejected (-1); got advantages "
                         f"{[round(float(a), 3) for a in adv[:6].tolist()]}...")
    return chosen, rejected


def dpo_loss(name: str, batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    chosen, rejected = pair_rows(batch, name)
    b = batch.advantages.shape[0]
    seq = require(est, "seq_logp", (b,), name)
    ref = require(est, "seq_ref_logp", (b,), name).detach().to(seq.dtype)
    log_ratio = seq - ref  # the implicit reward / beta of every row
    margin = log_ratio[chosen] - log_ratio[rejected]
    per_pair = -F.logsigmoid(config.beta * margin)
    pairs = torch.as_tensor(batch.loss_normalizer if batch.loss_normalizer is not None else chosen.numel(),
                            dtype=per_pair.dtype, device=per_pair.device)
    loss = per_pair.sum() / pairs.clamp(min=1)
    d = margin.detach().double()
    metrics: Metrics = {
        "num_pairs": torch.tensor(float(chosen.numel()), dtype=torch.float64),
        "pair_loss": per_pair.detach().double().mean(),  # -log sigmoid per pair, whatever the normaliser
        "reward_chosen": config.beta * log_ratio[chosen].detach().double().mean(),
        "reward_rejected": config.beta * log_ratio[rejected].detach().double().mean(),
        "reward_margin": config.beta * d.mean(),
        "reward_accuracy": (d > 0).double().mean(),
        "logp_chosen": seq[chosen].detach().double().mean(),
        "logp_rejected": seq[rejected].detach().double().mean(),
    }
    return finish({"pg_loss": loss}, metrics)


@LOSSES.register("vrpo", **ALGORITHM_DEFAULTS["vrpo"].loss)
def vrpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    return dpo_loss("vrpo", batch, est, config)


@LOSSES.register("dtrpo", **ALGORITHM_DEFAULTS["dtrpo"].loss)
def dtrpo_loss(batch: PolicyBatch, est: PolicyEstimates, config: LossConfig) -> tuple[torch.Tensor, Metrics]:
    return dpo_loss("dtrpo", batch, est, config)
