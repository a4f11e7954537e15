"""MDPO (autonomousvision/mdpo, arXiv 2508.13148): the clipped token loss on intermediate denoising states.

The learner samples are rl/step_samples.py's: one per trained (rollout, step), scored by estimator
`intermediate_state` at the state's masked positions, with per-token advantages A_t * c_j * lambda_t. Per counted
token: -min(rho a_j, clip(rho, 1 - eps, 1 + eps) a_j) (+ beta KL, k2 = (log ratio)^2 / 2 to the reference, as the
reference's code), and `seq_mean_token_mean`: the reference's per-(sample, step) micro-batch loss, its masked tokens'
sum over their count, averaged over the trained (sample, step) pairs. The reference weights its KL term by c_j too;
here it is unweighted (beta is 0 in MDPO's published config).
"""
from __future__ import annotations

from functools import partial

from rl.algorithms.core import LOSSES
from rl.algorithms.ppo import token_ppo_loss
from rl.published import ALGORITHM_DEFAULTS

LOSSES.register("mdpo", **ALGORITHM_DEFAULTS["mdpo"].loss)(partial(token_ppo_loss, name="mdpo"))
