"""Per-step rewards for methods that train on intermediate denoising states (MDPO), between the driver's stages:

    sampling = with_step_records(sampling, recipe)                    # the rollout records every step
    metrics.update(score_steps(prompts, samples, n=n, ...))           # after score_samples: r_t per step
    metrics.update(assign_step_advantages(samples, n, recipe.algorithm))  # after assign_advantages
    kept = learner_samples(kept, recipe.algorithm)                    # before learner.update: one per trained step

Every function is a no-op for algorithms that do not train on steps. Plain functions: no Ray, no actors.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from launch.driver_scoring import response_item
from launch.driver_tree import is_tree_method, tree_samples
from rl.sample import ScoredSample
from rl.step_samples import intermediate_sample, mdpo_step_advantages, padded_step_rewards, select_steps
from rollout.sampling import SamplingParams

STEP_METHODS = ("mdpo",)


def trains_on_steps(algorithm) -> bool:
    return algorithm.name in STEP_METHODS


def with_step_records(params: SamplingParams, recipe) -> SamplingParams:
    """The rollout's params with what the recipe's method reads from the trajectories recorded: every step's
    states (MDPO), per-token entropies (AGRPO's entropy proposal over steps)."""
    if trains_on_steps(recipe.algorithm):
        params = replace(params, record_steps=True)
    if getattr(recipe.estimator, "proposal", None) == "entropy":
        params = replace(params, record_entropy=True)
    return params


def prediction_text(traj, step: int, tokenizer) -> tuple[str, int]:
    """The answer decoded from step `step`'s prediction: its tokens through the first EOS, masks (positions the
    step did not predict) left out, special tokens skipped; and that token count."""
    mask_id, eos = traj.sampling["mask_token_id"], tokenizer.eos_token_id
    tokens = traj.step_predictions[step]
    tokens = tokens[tokens != mask_id].tolist()
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def score_steps(prompts, samples: list[ScoredSample], *, n: int, tokenizer, rewards, data, algorithm) -> dict:
    """Each usable sample's per-step rewards (ScoredSample.step_rewards): the reward of every step's prediction,
    in one batched reward call."""
    if not trains_on_steps(algorithm):
        return {}
    items, owners = [], []
    for i, sample in enumerate(samples):
        traj = sample.trajectory
        if traj.finish_reason.startswith("error") or traj.response_length == 0:
            continue
        if traj.step_predictions is None:
            raise ValueError(f"trajectory {traj.request_id}: no step records (the rollout ran without record_steps)")
        for step in range(traj.step_predictions.shape[0]):
            text, count = prediction_text(traj, step, tokenizer)
            items.append(response_item(prompts[i // n], text, count, data))
            owners.append(i)
    results = rewards.score(items) if items else []
    per_sample: dict[int, list[float]] = {}
    for owner, result in zip(owners, results, strict=True):
        per_sample.setdefault(owner, []).append(float(result["score"]))
    for i, values in per_sample.items():
        samples[i].step_rewards = torch.tensor(values, dtype=torch.float64)
    if not per_sample:
        return {}
    first = [v[0] for v in per_sample.values()]
    return {"reward/step_calls": float(len(items)), "reward/first_step_mean": sum(first) / len(first)}


def assign_step_advantages(samples: list[ScoredSample], n: int, algorithm) -> dict:
    """Per-step advantages (ScoredSample.step_advantages) of the kept samples, normalised per step within each
    prompt's group (rl.step_samples.mdpo_step_advantages)."""
    if not trains_on_steps(algorithm):
        return {}
    usable = [i for i, s in enumerate(samples) if s.keep and s.step_rewards is not None]
    if not usable:
        return {}
    rewards = padded_step_rewards([samples[i].step_rewards for i in usable])
    adv = mdpo_step_advantages(rewards, torch.tensor([i // n for i in usable]))
    for row, i in enumerate(usable):
        samples[i].step_advantages = adv[row, :samples[i].step_rewards.numel()].clone()
    return {"adv/step_abs_mean": float(adv.abs().mean())}


def learner_samples(kept: list[ScoredSample], algorithm) -> list[ScoredSample]:
    """What the learner trains on: the kept samples, or (step methods) one sample per trained step of each, or
    (tree methods) one sample per edge of each prompt's tree (launch/driver_tree.py)."""
    if is_tree_method(algorithm):
        return tree_samples(kept, algorithm)
    if not trains_on_steps(algorithm):
        return kept
    out = []
    for sample in kept:
        if sample.step_advantages is None:
            raise ValueError(f"trajectory {sample.request_id}: no step advantages (assign_step_advantages)")
        traj = sample.trajectory
        for step in select_steps(sample.step_advantages, algorithm.train_steps, sample.step_advantages.numel()):
            out.append(intermediate_sample(sample, step, float(sample.step_advantages[step]),
                                           traj.sampling["mask_token_id"]))
    return out
