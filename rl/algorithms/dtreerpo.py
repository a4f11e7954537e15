"""d-TreeRPO (THU-BPM/d-TreeRPO, arXiv 2512.09675): the clipped token loss on the edges of a rollout tree.

The learner samples are launch/driver_tree.py's: one per tree edge, scored by estimator `intermediate_state` (the
tokens unmasked between the parent and the child state, through the child's first EOS, from one forward of the
parent state), each with the child node's local advantage (rl/tree.py). Per edge: the mean over its scored tokens
of -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3(pi || ref); the mean over edges (`seq_mean_token_mean`),
as dtreerpo_trainer.compute_loss. Its time-scheduled self-distillation term is not built (docs/FIDELITY.md).
"""
from __future__ import annotations

from functools import partial

from rl.algorithms.core import LOSSES
from rl.algorithms.ppo import token_ppo_loss
from rl.published import ALGORITHM_DEFAULTS

LOSSES.register("dtreerpo", **ALGORITHM_DEFAULTS["dtreerpo"].loss)(partial(token_ppo_loss, name="dtreerpo"))
