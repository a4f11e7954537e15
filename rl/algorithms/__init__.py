"""Policy losses, each `fn(batch, estimates, config) -> (loss, metrics)`, registered by name in `LOSSES`.

Importing this package registers every loss; it imports only torch.
"""
from rl.algorithms import agrpo, dtreerpo, mdpo, ppo, sequence, spg, weighted  # noqa: F401  (registration)
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
