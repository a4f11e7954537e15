"""ESPO's ELBO estimator (ML-GSAI/ESPO, espo_trainer.py `_get_elbo` with reduce_var): antithetic coupled masks.

Per Monte Carlo draw k of one response of L tokens: a masked-token count x_k uniform on {0, ..., L}, a uniformly
random set S_k of x_k positions masked (weight (L + 1) / x_k on each), and its complement masked in a second
forward (L - x_k tokens, weight (L + 1) / (L - x_k)); both views halved and the draws averaged. Each view alone is
unbiased for the masked-diffusion ELBO (x uniform on 0..L with weight (L + 1)/x is LLaDA's l uniform on 1..L with
weight L / l), so their mean is too, with lower variance (every token is scored in exactly one view of a draw).
A view with no masked token (x = 0 or x = L) is skipped: it would score nothing (ESPO's code still runs it).

ESPO stratifies x over the samples of a device batch (x_i = round(k + i (L + 1) / b) mod (L + 1)); here the same
formula stratifies over the K draws of ONE sample, so that a sample's masks depend only on its own generator
(common random numbers for old / reference / current whatever the batch). Each sample's x is uniform on 0..L in
both, so the estimate has the same distribution for K = 1 (ESPO's published num_mc is 1 or 2).
"""
from __future__ import annotations

import torch

from rl.estimators.elbo import _register
from rl.masking import _F64, MASK_SAMPLERS, MaskDraw, _check_length, _exact_count_masks


def stratified_counts(length: int, num_draws: int, generator: torch.Generator) -> torch.Tensor:
    """(K,) masked-token counts on 0..L: a uniform start, then evenly spaced mod L + 1 (ESPO's forward_process)."""
    start = int(torch.randint(0, length + 1, (), generator=generator))
    spaced = torch.round(torch.linspace(float(start), start + (num_draws - 1) * (length + 1) / num_draws,
                                        steps=num_draws, dtype=_F64)).long()
    return spaced % (length + 1)


@MASK_SAMPLERS.register("espo")
def espo_masks(length: int, generator: torch.Generator, *, num_samples: int = 1, coupled: bool = True) -> MaskDraw:
    """ESPO's draw: per draw the mask of x_k ~ U{0..L} tokens (weight (L+1)/x_k) and, with `coupled`
    (ESPO's reduce_var, published true), its complement (weight (L+1)/(L-x_k)), both halved; / K. Empty views
    are dropped."""
    length = _check_length(length)
    if num_samples < 1:
        raise ValueError(f"espo: num_samples {num_samples} < 1")
    counts = stratified_counts(length, num_samples, generator)
    first = _exact_count_masks(counts, length, generator)
    views, weights = [first], [(length + 1) / counts.to(_F64).clamp(min=1)]
    if coupled:
        views.append(~first)
        weights.append((length + 1) / (length - counts).to(_F64).clamp(min=1))
    share = 1.0 / (len(views) * num_samples)
    masks = torch.stack(views, dim=1).reshape(-1, length)  # draw-major: view 1 and view 2 of draw k adjacent
    per_view = (torch.stack(weights, dim=1).reshape(-1) * share)
    keep = masks.any(dim=1)
    masks, per_view = masks[keep], per_view[keep]
    token_weights = torch.where(masks, per_view[:, None], torch.zeros((), dtype=_F64)).float()
    return MaskDraw(masks, token_weights, masks.sum(1).to(_F64) / (length + 1))



espo_estimator = _register("espo", num_samples=1, coupled=True)
