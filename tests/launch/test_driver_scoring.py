"""Steps 3-4 of an RL step without Ray (launch/driver_scoring.py): each response scored against its own prompt, a
failed generation never scored, and group advantages worked out by hand (mean-centred per prompt, a response at the
length limit counted wrong, failed generations left out of their group and not kept)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from launch.data import Prompt
from launch.driver_scoring import assign_advantages, score_samples
from rl.sample import ScoredSample
from rollout.trajectory import Trajectory

MAX_TOKENS = 6


class DigitTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i) for i in ids)


class ExactMatch:
    """A reward service: 1 when the response is the reference; records what it was asked."""

    def __init__(self):
        self.items = []

    def score(self, items):
        self.items += items
        return [{"score": float(it["response"] == it["reference"]),
                 "reason": "correct" if it["response"] == it["reference"] else "wrong: no match", "metrics": {}}
                for it in items]


def _sample(response: list[int], finish: str = "eos") -> ScoredSample:
    ids = torch.tensor(response + [0] * (MAX_TOKENS - len(response)))
    zeros = torch.zeros(MAX_TOKENS)
    return ScoredSample(Trajectory(prompt_ids=torch.tensor([1, 2]), response_ids=ids, step_map=zeros.long(),
                                   logprobs=zeros, confidence=zeros, valid_length=len(response), nfe=1,
                                   finish_reason=finish, block_size=2))


def test_scores_each_response_against_its_prompt_and_advantages_by_hand():
    prompts = [Prompt(0, (1, 2), "first", "12"), Prompt(1, (3, 4), "second", "34")]
    samples = [_sample([1, 2]), _sample([9]), _sample([1, 2], finish="error: worker died"),  # prompt 0
               _sample([3, 4, 3, 4, 3]), _sample([3, 4]), _sample([5])]  # prompt 1; the first one at the limit
    rewards = ExactMatch()
    data = SimpleNamespace(prompt_field="prompt", answer_field="answer")
    metrics = score_samples(prompts, samples, n=3, tokenizer=DigitTokenizer(), rewards=rewards, data=data)
    assert [it["prompt"] for it in rewards.items] == ["first", "first", "second", "second", "second"]  # no failed one
    assert [s.response_text for s in samples[:2]] == ["12", "9"]
    assert [s.reward for s in samples] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert samples[2].reason == "error: worker died"
    assert metrics["rollout/errors"] == 1 and metrics["reward/accuracy"] == pytest.approx(2 / 6)
    assert metrics["reward/reason/error"] == 1 and metrics["reward/reason/wrong"] == 3

    samples[3].reward, samples[3].reason = 1.0, "correct"  # correct, but at the length limit: counted wrong
    algorithm = SimpleNamespace(name="tracerl", advantage="mean_centered", length_limit_margin=1,
                                filter=SimpleNamespace(drop_zero_variance=False, accuracy_lo=None, accuracy_hi=None))
    assign_advantages(samples, 3, algorithm, max_tokens=MAX_TOKENS)
    # prompt 0: usable rewards [1, 0] (the failed one left out), mean 1/2; prompt 1: [0 (cut), 1, 0], mean 1/3
    want = [0.5, -0.5, 0.0, -1 / 3, 2 / 3, -1 / 3]
    assert [s.advantage for s in samples] == pytest.approx(want)
    assert [s.keep for s in samples] == [True, True, False, True, True, True]
