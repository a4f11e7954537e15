"""A recipe's rollout section -> the engine's SamplingParams: the one mapping, used by training (the driver's
rollouts and greedy evaluations) and by `diffrl eval` alike.

    params = sampling_params(recipe.rollout, block_size=decode_block(recipe))
    params = sampling_params(run.rollout, block_size=policy.spec.block_size, max_tokens=dataset_budget)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollout.sampling import SamplingParams

if TYPE_CHECKING:
    from launch.recipe import Recipe, RolloutSection

__all__ = ["decode_block", "sampling_params"]

DYNAMIC_THRESHOLD = 0.9  # TraDo's dynamic decoding threshold, where a rollout section leaves it unset


def decode_block(recipe: Recipe) -> int:
    """Tokens per decoding block (rollout.block_size is filled from the model during validation)."""
    return recipe.rollout.block_size or recipe.model.block_size or recipe.rollout.max_tokens


def sampling_params(rollout: RolloutSection, *, block_size: int, max_tokens: int | None = None,
                    greedy: bool = False) -> SamplingParams:
    """Decoding settings of `rollout` for blocks of `block_size` tokens; `max_tokens` (default rollout.max_tokens)
    is rounded up to whole blocks; `greedy` decodes at temperature 0 whatever the section says."""
    budget = -(-int(max_tokens or rollout.max_tokens) // block_size) * block_size
    steps_per_block = rollout.steps_per_block
    if rollout.steps is not None:
        steps_per_block = rollout.steps // max(1, budget // block_size)
    extra: dict[str, Any] = {}
    if rollout.remasking == "low_confidence_dynamic":
        extra["threshold"] = rollout.threshold if rollout.threshold is not None else DYNAMIC_THRESHOLD
    elif rollout.remasking == "threshold_schedule":  # LLaDA2's rule; its generate's default threshold 0.95
        extra["threshold"] = rollout.threshold if rollout.threshold is not None else 0.95
    elif rollout.remasking == "entropy_bounded":
        extra["entropy_bound"] = rollout.threshold
    temperature = rollout.temperature if rollout.temperature is not None else 1.0
    return SamplingParams(
        temperature=0.0 if greedy else temperature, top_k=rollout.top_k or 0, top_p=rollout.top_p,
        max_tokens=budget, remasking=rollout.remasking, steps_per_block=steps_per_block,
        min_tokens_per_step=rollout.min_tokens_per_step, schedule="ass" if rollout.ass else None,  # None: the family's
        eoser_gamma_min=rollout.eoser.gamma_min if rollout.eoser is not None else None,
        stop_at_eos=rollout.stop_at_eos, **extra)
