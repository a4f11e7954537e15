"""IGPO (arXiv 2509.10396; facebookresearch/igpo): GRPO whose zero-advantage groups get inpainted hints.

The loss is d1's token-level clipped objective on the one-step estimator (the released run: every completion
position masked in the scoring forward, prompt never masked), l = -min(rho A, clip(rho, 1 - 0.2, 1 + 0.2) A)
+ 0.01 k3 KL to the reference, summed over the batch's counted tokens / their number, A = R - group mean. What is
IGPO's own lives elsewhere: which groups get hints and where (rl/inpainting.py, launch/igpo.py), pre-filled
positions in the engine (rollout GenerationRequest.prefill), and the learner never counting a pre-filled token
(rl.estimators.base.token_mask_of: Trajectory.prefilled), so hints are never trained on as the policy's choice.
"""
from __future__ import annotations

from functools import partial

from rl.algorithms.core import LOSSES
from rl.algorithms.ppo import token_ppo_loss
from rl.published import ALGORITHM_DEFAULTS

LOSSES.register("igpo", **ALGORITHM_DEFAULTS["igpo"].loss)(partial(token_ppo_loss, name="igpo"))
