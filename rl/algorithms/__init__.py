"""Policy losses, each `fn(batch, estimates, config) -> (loss, metrics)`, registered by name in `LOSSES`.

Importing this package registers every loss; it imports only torch.
"""
from rl.algorithms import (  # noqa: F401  (registration)
    agrpo, bgpo, dtreerpo, ebpo, espo, igpo, justgrpo, mdpo, ppo, preference, sequence, spg, weighted)
from rl.algorithms.core import (
    AGG_MODES,
    LOSSES,
    LossConfig,
    PolicyBatch,
    PolicyEstimates,
    aggregate,
    compute_loss,
    kl_penalty,
    loss_normalizer,
    make_loss_config,
)

__all__ = ["AGG_MODES", "LOSSES", "LossConfig", "PolicyBatch", "PolicyEstimates", "aggregate", "compute_loss",
           "kl_penalty", "loss_normalizer", "make_loss_config"]
