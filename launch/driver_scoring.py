"""Steps 3-4 of an RL step (launch/driver.py): score each response against its prompt, then group-relative
advantages. Plain functions of the batch and the recipe's sections (no Ray, no actors):

    metrics = score_samples(prompts, samples, n=n, tokenizer=tok, rewards=service, data=recipe.data)
    metrics.update(assign_advantages(samples, n, recipe.algorithm, max_tokens=recipe.rollout.max_tokens))

Sample i answers prompts[i // n] (n samples per prompt, in prompt order); a failed generation (finish reason
`error...`) gets reward 0 and its finish reason without a reward call, and is never kept for the learner.
"""
from __future__ import annotations

import torch

from launch.data import Prompt, reward_item
from launch.metrics import reward_summary
from rewards.result import reason_category
from rl.advantages import advantage_estimator, near_length_limit
from rl.sample import ScoredSample


def response_item(prompt: Prompt, text: str, response_len: int, data) -> dict:
    """The reward item of one response, with the recipe's `data` prompt/answer column names."""
    return reward_item(prompt, text, response_len, prompt_field=data.prompt_field, answer_field=data.answer_field)


def score_samples(prompts: list[Prompt], samples: list[ScoredSample], *, n: int, tokenizer, rewards, data) -> dict:
    """Decode each response, score it with the reward service `rewards` (one batched call), set each sample's
    reward, reason and reward metrics; returns the batch's reward and rollout metrics."""
    items, scored = [], []
    for i, sample in enumerate(samples):
        traj = sample.trajectory
        sample.response_text = tokenizer.decode(traj.response_ids[:traj.valid_length].tolist(),
                                                skip_special_tokens=True)
        if traj.finish_reason.startswith("error"):
            sample.reward, sample.reason = 0.0, traj.finish_reason
            continue
        items.append(response_item(prompts[i // n], sample.response_text, traj.valid_length, data))
        scored.append(sample)
    results = rewards.score(items) if items else []
    for sample, result in zip(scored, results, strict=True):
        sample.reward, sample.reason = float(result["score"]), result["reason"]
        sample.reward_metrics = result["metrics"]
    rewards_t = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    reasons: dict[str, int] = {}
    for s in samples:
        category = reason_category(s.reason)
        reasons[category] = reasons.get(category, 0) + 1
    lengths = torch.tensor([float(s.trajectory.valid_length) for s in samples])
    return {"reward/mean": float(rewards_t.mean()), "reward/std": float(rewards_t.std(unbiased=False)),
            "reward/accuracy": reasons.get("correct", 0) / len(samples),
            "rollout/response_len": float(lengths.mean()), "rollout/errors": len(samples) - len(scored),
            **reward_summary(results),
            **{f"reward/reason/{k}": v for k, v in sorted(reasons.items())}}


def assign_advantages(samples: list[ScoredSample], n: int, algorithm, *, max_tokens: int) -> dict:
    """Group-relative advantages of the usable samples (groups = prompts) by the `algorithm` section's estimator;
    sets each sample's advantage and keep flag (filtered groups and failed generations: keep=False)."""
    usable = [i for i, s in enumerate(samples)
              if not s.trajectory.finish_reason.startswith("error") and s.trajectory.response_length > 0]
    for s in samples:
        s.advantage, s.keep = 0.0, False
    if not usable:
        return {"adv/frac_samples_kept": 0.0}
    rewards = torch.tensor([samples[i].reward for i in usable], dtype=torch.float32)
    groups = torch.tensor([i // n for i in usable])
    correct = torch.tensor([samples[i].reason == "correct" for i in usable])
    lengths = torch.tensor([samples[i].trajectory.valid_length for i in usable])
    cut = near_length_limit(lengths, max_tokens, algorithm.length_limit_margin)
    rewards, correct = torch.where(cut, 0.0, rewards), correct & ~cut  # TraceRL: cut-off responses are wrong
    flt = algorithm.filter
    estimator = advantage_estimator(algorithm.name)
    result = estimator(rewards, group_ids=groups, norm=algorithm.advantage, correct=correct,
                       drop_zero_variance=flt.drop_zero_variance, accuracy_lo=flt.accuracy_lo,
                       accuracy_hi=flt.accuracy_hi)
    for pos, i in enumerate(usable):
        samples[i].advantage, samples[i].keep = float(result.advantages[pos]), bool(result.keep[pos])
    return {f"adv/{k}": float(v) for k, v in result.metrics.items()}
