"""Remasking policies and step schedules (uniform, ASS) and EOSER's gamma, against their formulas."""
from __future__ import annotations

import math

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
                              "random", "topk_margin", "entropy", "origin", "threshold_schedule",
                              "left_to_right", "rcr"}


def test_left_to_right_takes_the_leftmost_masked_position_whatever_the_count():
    assert _select("left_to_right", 1) == [0] and _select("left_to_right", 4) == [0]
    policy = make_remasking(SamplingParams(remasking="left_to_right"))
    masked = torch.tensor([[False, True, True, False], [True, False, True, True], [False, False, False, False]])
    chosen = policy.select_batch(None, None, masked, torch.tensor([3, 3, 3]), [None] * 3)
    assert chosen.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4]


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
    assert eoser_gamma(0, 1, 0.01, ass=True) == 1.0  # EOSER-ASS-RL: total_steps > 1, else the max factor


def test_dream_schedule_follows_dreams_formula():
    """Dream: t = linspace(1, 1e-3, S + 1); step i unmasks int(m_i * (1 - t_{i+1} / t_i)), the last step the rest.
    By hand for 8 tokens over 4 steps: t = 1, .75025, .5005, .25075, .001 -> int(8 * .24975) = 1,
    int(7 * .3329) = 2, int(5 * .4990) = 2, and the remaining 3."""
    from rollout.decoding.schedules import dream_schedule, dream_transfer_probability

    assert dream_schedule(8, 4) == [1, 2, 2, 3]
    assert dream_schedule(32, 16) == [1] + [2] * 14 + [3]  # one fewer first, the remainder last
    assert dream_schedule(16, 16) == [0] + [1] * 14 + [2]  # steps == length: the first step unmasks nothing
    assert block_schedule(SamplingParams(steps_per_block=16), 16, "dream") == [1] * 14 + [2]  # zero steps dropped
    assert block_schedule(SamplingParams(steps_per_block=4), 8, "dream") == [1, 2, 2, 3]
    assert block_schedule(SamplingParams(steps_per_block=4, schedule="uniform"), 8, "dream") == [2, 2, 2, 2]
    assert block_schedule(SamplingParams(steps_per_block=4), 8) == [2, 2, 2, 2]  # LLaDA's family default
    for steps in (1, 3, 7, 64):
        assert sum(dream_schedule(64, steps)) == 64
    assert dream_transfer_probability(0, 4) == pytest.approx(0.24975, abs=1e-6)
    assert dream_transfer_probability(2, 4) == pytest.approx(1 - 0.25075 / 0.5005, abs=1e-6)
    assert dream_transfer_probability(3, 4) == 1.0


def test_dream_scores_match_their_definitions():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(3))
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    conf = probs.max(-1).values
    margin = make_remasking(SamplingParams(remasking="topk_margin")).selection_key(logp, conf)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    assert torch.allclose(margin, sorted_probs[:, 0] - sorted_probs[:, 1])
    neg_entropy = make_remasking(SamplingParams(remasking="entropy")).selection_key(logp, conf)
    naive = torch.tensor([sum(float(p) * math.log(float(p) + 1e-10) for p in row) for row in probs])
    assert torch.allclose(neg_entropy, naive.float(), atol=1e-5)
    assert torch.equal(make_remasking(SamplingParams()).selection_key(logp, conf), conf)


def test_origin_transfers_each_position_with_probability_p():
    policy = make_remasking(SamplingParams(remasking="origin"))
    conf = torch.rand(40)
    chosen = policy.select(conf, None, 0, torch.Generator().manual_seed(4), probability=0.3)
    u = torch.rand(40, generator=torch.Generator().manual_seed(4))
    assert chosen.tolist() == (u < 0.3).nonzero().squeeze(-1).tolist()
    assert policy.select(conf, None, 0, torch.Generator().manual_seed(4), probability=1.0).tolist() == \
        list(range(40))
    with pytest.raises(ValueError, match="eoser_gamma_min"):
        SamplingParams(remasking="origin", eoser_gamma_min=0.1)
