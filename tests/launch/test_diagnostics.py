"""Per-step diagnostics: the probe's greedy vs sampled accuracy and its fixed seeds, the advantage scale, and the
entropy metric (a naive entropy, and no autograd graph behind it)."""
from __future__ import annotations

import math

import pytest
import torch

from launch.data import Prompt
from launch.diagnostics import probe_metrics, probe_requests
from launch.recipe import load_recipe
from rl.advantages import group_advantages


def _result(ok: bool) -> dict:
    return {"score": float(ok), "reason": "correct" if ok else "wrong: 3 != 4", "metrics": {}}


def test_probe_metrics_compare_greedy_and_sampled_on_the_same_prompts():
    greedy = [_result(True), _result(False)]
    sampled = [_result(x) for x in (True, False, False, False, True, False)]  # 3 samples a prompt: 2 of 6 right
    m = probe_metrics(greedy, sampled, 3)
    assert m["eval/probe/greedy_accuracy"] == 0.5 and m["eval/probe/sampled_accuracy"] == pytest.approx(2 / 6)
    assert m["eval/probe/greedy_minus_sampled"] == pytest.approx(0.5 - 2 / 6) and m["eval/probe/num_prompts"] == 2
    assert probe_metrics(greedy, [], 3) == {}
    with pytest.raises(ValueError, match="5 sampled results for 2 prompts x 3"):
        probe_metrics(greedy, sampled[:5], 3)


def test_probe_requests_are_a_fixed_set_with_fixed_seeds():
    prompts = [Prompt(i, (1, 2, i), f"p{i}", "a") for i in (7, 3, 9)]
    first = probe_requests(prompts, sampling=None, seed=5, items=2, samples=2)
    again = probe_requests(prompts, sampling=None, seed=5, items=2, samples=2)
    assert [p.index for p, _ in first] == [7, 7, 3, 3]
    assert [r.seed for _, r in first] == [r.seed for _, r in again]  # every evaluation draws the same samples
    assert len({r.seed for _, r in first}) == 4
    assert [r.seed for _, r in probe_requests(prompts, None, seed=6, items=2, samples=2)] != [r.seed for _, r in first]
    assert probe_requests(prompts, None, seed=5, items=0, samples=2) == []


def test_advantage_abs_mean_is_logged():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    result = group_advantages(rewards, group_size=4, norm="mean_centered")
    adv = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]  # group 2 has zero variance (kept, advantage 0)
    assert result.metrics["adv_abs_mean"].item() == pytest.approx(sum(abs(a) for a in adv) / 8)
    assert result.metrics["frac_groups_zero_std"].item() == 0.5


def test_entropy_metric_is_the_predictive_entropy_without_a_graph(tiny_policies):
    from rollout.models.policy import token_logprobs

    policy = tiny_policies["block"]
    hidden = torch.randn(5, policy.model.config.hidden_size, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4, 5])
    logp, entropy = token_logprobs(policy, hidden, targets, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad  # a metric: nothing kept for backward
    probs = torch.softmax(policy.logits_from_hidden(hidden).float(), -1).detach()
    naive = [-sum(p * math.log(p) for p in row.tolist() if p > 0) for row in probs]
    assert entropy.tolist() == pytest.approx(naive, rel=1e-4)


def test_recipe_diagnostics_defaults():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny-tracerl.yaml")
    assert recipe.learner.log_entropy and recipe.trainer.probe_items == 32 and recipe.trainer.probe_samples == 4
    from launch.driver_roles import learner_config

    assert learner_config(recipe).entropy
