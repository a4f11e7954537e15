"""Group-relative advantages and filters against naive per-group loops."""
from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import ADVANTAGES, advantage_estimator, group_advantages, wd1_weights


def _naive(rewards: list[float], groups: list[int], norm: str, eps: float = 1e-6) -> list[float]:
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))  # population std
        out.append(r - mean if norm == "mean_centered" else (r - mean) / (std + eps))
    return out


@pytest.mark.parametrize("norm", ["mean_centered", "zscore"])
def test_matches_naive_loop_contiguous_groups(norm):
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(0))
    res = group_advantages(rewards, group_size=6, norm=norm)
    expected = _naive(rewards.tolist(), [i // 6 for i in range(24)], norm)
    assert torch.allclose(res.advantages, torch.tensor(expected), atol=1e-6)
    assert res.keep.all() and res.group_ids.tolist() == [i // 6 for i in range(24)]
    assert ADVANTAGES.get("group_relative")(rewards, group_size=6, norm=norm).advantages.equal(res.advantages)


def test_uneven_labelled_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0, 3.0])
    labels = torch.tensor([7, 7, 3, 3, 3, 9, 7])  # arbitrary labels, interleaved, sizes 3/3/1
    res = group_advantages(rewards, group_ids=labels, norm="zscore")
    expected = _naive(rewards.tolist(), labels.tolist(), "zscore")
    assert torch.allclose(res.advantages, torch.tensor(expected), atol=1e-5)
    assert res.advantages[5] == 0  # a singleton group has no relative signal


def test_zero_variance_groups_and_eps():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    res = group_advantages(rewards, group_size=3, norm="zscore")
    assert torch.equal(res.advantages[:3], torch.zeros(3)) and res.keep.all()
    dropped = group_advantages(rewards, group_size=3, norm="zscore", drop_zero_variance=True)
    assert dropped.keep.tolist() == [False] * 3 + [True] * 3
    assert dropped.metrics["frac_groups_dropped"].item() == 0.5
    assert dropped.metrics["frac_groups_zero_std"].item() == 0.5
    big_eps = group_advantages(rewards, group_size=3, norm="zscore", eps=1.0)
    std = math.sqrt(2 / 9)
    assert torch.allclose(big_eps.advantages[3:], torch.tensor([-1 / 3, 2 / 3, -1 / 3]) / (std + 1.0))


def test_accuracy_filter_is_an_option():
    # group accuracies 0/5, 1/5, 2/5, 4/5, 5/5
    correct = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]).bool()
    rewards = correct.float() + 0.01 * torch.arange(25).float()  # rewards not exactly 0/1: use `correct`
    res = group_advantages(rewards, group_size=5, norm="zscore", accuracy_lo=0.2, accuracy_hi=0.8, correct=correct)
    assert res.keep.view(5, 5)[:, 0].tolist() == [False, True, True, True, False]  # bounds inclusive
    assert (res.advantages[~res.keep] == 0).all()
    assert res.metrics["frac_groups_dropped"].item() == pytest.approx(0.4)
    kept = res.advantages[res.keep].double()
    assert res.metrics["adv_mean"].item() == pytest.approx(kept.mean().item(), abs=1e-6)
    assert res.metrics["adv_max"].item() == pytest.approx(kept.max().item())
    # without `correct`, correctness is reward >= success_threshold
    res2 = group_advantages(correct.float(), group_size=5, accuracy_lo=0.2, accuracy_hi=0.8)
    assert torch.equal(res2.keep, res.keep)
    assert group_advantages(correct.float(), group_size=5).keep.all()  # off by default


def test_errors():
    with pytest.raises(ValueError, match="group_size 4 does not divide batch 6"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="unknown norm"):
        group_advantages(torch.zeros(6), group_size=3, norm="max")
    with pytest.raises(ValueError, match="accuracy_lo 0.9 > accuracy_hi 0.1"):
        group_advantages(torch.zeros(6), group_size=3, accuracy_lo=0.9, accuracy_hi=0.1)


def test_wd1_weights_match_naive_softmax():
    adv = torch.randn(12, generator=torch.Generator().manual_seed(1))
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    w = wd1_weights(adv, groups, temperature=0.7)
    for g in range(3):
        idx = (groups == g).nonzero().flatten()
        a = adv[idx].double() * 0.7
        expected = (torch.softmax(a, 0) - torch.softmax(-a, 0)) * idx.numel()
        assert torch.allclose(w[idx].double(), expected, atol=1e-6)
        assert abs(w[idx].sum().item()) < 1e-5
    raw = wd1_weights(adv, groups, scale_by_group_size=False)
    for g in range(3):  # within a group the weight increases with the advantage
        idx = (groups == g).nonzero().flatten()
        order = adv[idx].argsort()
        assert (raw[idx][order].diff() > 0).all()


def test_losses_find_their_advantage_estimator_by_name():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])  # group 1 has zero variance: dropped
    options = dict(group_ids=groups, norm="mean_centered", drop_zero_variance=True)
    assert advantage_estimator("tracerl") is group_advantages and advantage_estimator("gdpo") is group_advantages
    plain = advantage_estimator("tracerl")(rewards, **options)
    wd1 = advantage_estimator("wd1")(rewards, **options)
    assert wd1.keep.tolist() == plain.keep.tolist() == [True] * 3 + [False] * 3
    assert torch.equal(wd1.advantages[:3], wd1_weights(plain.advantages[:3], groups[:3]))
    assert wd1.advantages[:3].abs().sum() > 0 and wd1.advantages[3:].tolist() == [0.0] * 3
