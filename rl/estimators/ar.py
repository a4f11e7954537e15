"""Exact left-to-right likelihood (JustGRPO): log p(y) = sum_t log p(y_t | prompt, y_<t, masks after t).

A dLLM decoded in AR order (rollout remasking `left_to_right`: one token a step, leftmost first) is an
autoregressive model whose conditional at position t is the model's prediction there with the prefix decoded and
every later position masked (JustGRPO's `logprob_loss`: x = [prompt, y_<t, MASK...]). Its sequence log-prob is then
exact, no ELBO. That is the trajectory likelihood of the AR trajectory (step t unmasks position t), so this estimator
scores the response as if its step map were 0, 1, ..., L-1, whatever the rollout recorded: full-attention models
cost one forward per position; block models score every position in one forward holding a noisy canvas per
position within a block (the trajectory estimator's shared clean part: canvas j has positions < j of every block
decoded, each block seeing the clean blocks before it and its own canvas, the context it was decoded in).

`check_order`: the recorded step maps must be that order (a sample decoded otherwise would be scored under a
trajectory it did not follow); the error names the sample.
"""
from __future__ import annotations

import torch

from rl.estimators.base import ESTIMATORS, Estimate, EstimatorInput
from rl.estimators.trajectory import layout_tokens, trajectory_estimator


def ar_step_map(length: int) -> torch.Tensor:
    """The step map of a left-to-right decode: position t unmasked at step t."""
    return torch.arange(length, dtype=torch.long)


def check_ar_order(inp: EstimatorInput) -> None:
    """Raise ValueError naming the first sample whose recorded step map is not strictly left to right, one token a
    step (ranks of the steps equal the positions)."""
    if inp.step_maps is None:
        return
    for b, steps in enumerate(inp.step_maps):
        steps = steps.long().cpu()
        if steps.numel() > 1 and not bool((steps[1:] > steps[:-1]).all()):
            raise ValueError(f"estimator 'ar_exact': sample {inp.sample_keys[b]!r} was not decoded left to right, "
                             "one token a step (rollout.remasking: left_to_right)")


@ESTIMATORS.register("ar_exact", check_order=True)
def ar_exact_estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0, check_order: bool = True,
                       temperature: float = 1.0, return_entropy: bool = False, return_hidden: bool = False,
                       packing=None) -> Estimate:
    del seed, inner_iter  # deterministic
    if check_order:
        check_ar_order(inp)
    return trajectory_estimator(policy, ar_input(inp), shrink=1, temperature=temperature,
                                return_entropy=return_entropy, return_hidden=return_hidden, packing=packing)


def ar_input(inp: EstimatorInput) -> EstimatorInput:
    """The batch with every step map replaced by the left-to-right one."""
    return EstimatorInput(inp.prompts, inp.responses, inp.sample_keys, inp.valid_lengths,
                          [ar_step_map(inp.length(b)) for b in range(len(inp))], inp.block_size, inp.frozen)


def ar_layout_tokens(spec, inp: EstimatorInput, *, check_order: bool = True) -> list[int]:
    """The learner's token budget per sample (rl.estimators.base.layout_tokens): the trajectory estimator's layout
    of the left-to-right trajectory (a block model's one forward holds a canvas per position within a block)."""
    del check_order
    return layout_tokens(spec, ar_input(inp), shrink=1)


ar_exact_estimator.layout_tokens = ar_layout_tokens
