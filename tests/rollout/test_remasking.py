"""Remasking policies and step schedules (uniform, ASS) and EOSER's gamma, against their formulas."""
from __future__ import annotations

import pytest
import torch

from rollout.decoding.schedules import ass_schedule, block_schedule, eoser_gamma, uniform_schedule
from rollout.remasking import REMASKING, make_remasking
from rollout.sampling import SamplingParams

CONF = torch.tensor([0.2, 0.95, 0.5, 0.97, 0.1])


def _select(name, count=2, entropy=None, seed=0, **params):
    policy = make_remasking(SamplingParams(remasking=name, **params))
    return policy.select(CONF, entropy, count, torch.Generator().manual_seed(seed)).tolist()


def test_registry_names():
    assert set(REMASKING) == {"sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded",
                              "random", "topk_margin", "entropy", "origin"}


def test_sequential_and_static_take_exactly_the_count():
    assert _select("sequential", 2) == [0, 1]
    assert sorted(_select("low_confidence_static", 2)) == [1, 3]
    assert sorted(_select("low_confidence_static", 9)) == [0, 1, 2, 3, 4]  # never more than what is masked


def test_dynamic_takes_everything_above_the_threshold_with_a_floor():
    assert sorted(_select("low_confidence_dynamic", threshold=0.9)) == [1, 3]
    assert sorted(_select("low_confidence_dynamic", threshold=0.99)) == [3]  # floor 1: the most confident
    assert sorted(_select("low_confidence_dynamic", threshold=0.99, min_tokens_per_step=3)) == [1, 2, 3]


def test_entropy_bounded_takes_the_lowest_entropies_within_the_bound():
    ent = torch.tensor([0.5, 0.1, 2.0, 0.3, 0.05])
    assert _select("entropy_bounded", entropy=ent, entropy_bound=0.5) == [4, 1, 3]
    assert _select("entropy_bounded", entropy=ent, entropy_bound=0.01) == [4]  # floor


def test_random_uses_only_the_request_generator():
    a = _select("random", 3, seed=5)
    assert a == _select("random", 3, seed=5) and len(set(a)) == 3
    assert any(_select("random", 3, seed=s) != a for s in range(6, 12))


def test_uniform_schedule_splits_like_llada():
    assert uniform_schedule(8, 4) == [2, 2, 2, 2]
    assert uniform_schedule(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="steps_per_block"):
        uniform_schedule(4, 5)


@pytest.mark.parametrize("length,expected", [
    (128, [1, 2, 4, 8, 16, 32, 65]), (4, [1, 3]), (8, [1, 2, 5]), (32, [1, 2, 4, 8, 17]), (1, [1]), (2, [2]),
    (100, [1, 2, 4, 8, 16, 69]),
])
def test_ass_schedule(length, expected):
    assert ass_schedule(length) == expected
    assert sum(ass_schedule(length)) == length


def test_block_schedule_defaults_to_one_token_a_step():
    assert block_schedule(SamplingParams(), 4) == [1, 1, 1, 1]
    assert block_schedule(SamplingParams(steps_per_block=2), 4) == [2, 2]
    assert block_schedule(SamplingParams(schedule="ass"), 128) == [1, 2, 4, 8, 16, 32, 65]


def test_eoser_gamma_linear_and_ass():
    steps = 5
    assert [eoser_gamma(s, steps, 0.4) for s in range(steps)] == pytest.approx([0.4, 0.55, 0.7, 0.85, 1.0])
    ass = [eoser_gamma(s, 7, 0.01, ass=True) for s in range(7)]
    assert ass == pytest.approx([0.01 + 0.99 * (2 ** (s + 1) - 1) / 128 for s in range(7)])
    assert ass[0] == pytest.approx(0.01 + 0.99 / 128) and ass[-1] == pytest.approx(0.01 + 0.99 * 127 / 128)
    assert eoser_gamma(0, 1, 0.4) == 1.0
