"""Countdown's step credit (`countdown_reward(..., step_credit=c)`): a wrong worked answer earns c x (leading steps
that keep the target reachable) / (numbers - 2). Checked against a naive oracle written from the rule (plain loops
over every pair, operator and order, no shared code with the verifier's memoised search), over every true first
step of a grid of problems, and against chains a reward-seeking policy would try."""
from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from rl.tasks import countdown_reward
from rl.tasks.countdown import on_course_steps, parse_chain

OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
       "/": lambda x, y: x / y if y else None}


def _true_steps(values: list[Fraction]):
    """Every true integer step over two of `values` (by position, both orders): (i, j, op, result)."""
    for i, j in itertools.permutations(range(len(values)), 2):
        for op, fn in OPS.items():
            out = fn(values[i], values[j])
            if out is not None and out.denominator == 1:
                yield i, j, op, out


def _completes(values: list[Fraction], target: int) -> bool:
    """Naive: some sequence of true integer steps over all `values` ends at `target`."""
    if len(values) == 1:
        return values[0] == target
    for i, j, _, out in _true_steps(values):
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        if _completes(rest + [out], target):
            return True
    return False


def _problems():
    """Three- and four-number problems with targets each side of what is reachable."""
    for numbers in ([3, 5, 7], [2, 2, 9], [1, 12, 4], [6, 10, 15], [4, 8, 3, 2]):
        for target in (1, 4, 11, 13, 17, 22, 29, 41, 60, 97):
            yield numbers, target


def _first_steps(numbers: list[int]):
    values = [Fraction(n) for n in numbers]
    for i, j, op, out in _true_steps(values):
        rest = [v for k, v in enumerate(values) if k not in (i, j)] + [out]
        yield f"{numbers[i]}{op}{numbers[j]}={int(out)}", rest


@pytest.mark.parametrize(("numbers", "target"), list(_problems()))
def test_every_true_first_step_matches_the_naive_oracle(numbers, target):
    ref = {"numbers": numbers, "target": target}
    checked = 0
    for first, rest in _first_steps(numbers):
        on_course = _completes(rest, target)
        # finish with a step that is false for sure (its claimed result is off by one), so the answer is wrong
        # whatever the first step was
        if len(numbers) == 3:
            a, b = int(rest[0]), int(rest[1])
            chain = ",".join([first, f"{a}+{b}={a + b + 1}"])
            want = 0.5 * on_course
        else:
            a, b, c = (int(v) for v in rest)
            # second step a+b (true); on course for it too only if the oracle says so from the pool it leaves
            second_pool = [Fraction(a + b), Fraction(c)]
            second_on = on_course and _completes(second_pool, target)
            chain = ",".join([first, f"{a}+{b}={a + b}", f"{a + b}+{c}={a + b + c + 1}"])
            want = 0.5 * (on_course + second_on) / 2
        got = countdown_reward("", chain, ref, step_credit=0.5)
        assert got["metrics"]["correct"] == 0.0
        assert got["score"] == pytest.approx(want), chain
        checked += 1
    assert checked >= 8


def test_off_by_default_and_right_answers_pay_one():
    ref = {"numbers": [15, 3, 20], "target": 32}
    assert countdown_reward("", "15-3=12,20+12=31", ref)["score"] == 0.0
    assert countdown_reward("", "15-3=12,20+12=31", ref, step_credit=0.5)["score"] == 0.5
    for credit in (0.0, 0.5, 0.9):
        assert countdown_reward("", "15-3=12,20+12=32", ref, step_credit=credit)["score"] == 1.0
    # an honest miss keeps its format credit when that pays more than the (absent) step credit
    assert countdown_reward("", "15+3=18,20+18=38", ref, format_score=0.1, step_credit=0.5)["score"] == 0.1


@pytest.mark.parametrize("answer", [
    "15-3=12",  # the good first step alone: not a chain of two steps
    "15-3=12,20+12=32,1+1=2",  # a right answer with a step appended: wrong number of steps
    "15-3=12,15-3=12",  # the good first step twice: the second takes numbers already used
    "15-3=12,12+12=24",  # the good first step, then its result twice instead of the number left
    "16-4=12,20+12=32",  # a "good" first step on numbers that are not given
    "15-3=13,20+13=32",  # a false first step whose claimed result would finish the chain
    "15-3=12,20+12=32;1+1=2",  # search-style attempts earn no step credit, a false attempt scores 0
    "20-12=8,8+15=23;15-3=12,20+12=33",  # the good step in a later attempt: no step credit either
    "15-3=12 , 20+12=33 junk",  # anything after the chain: not a chain
    "15-3=12," * 30 + "20+12=33",  # over the line cap
])
def test_partial_chains_a_policy_would_try_earn_nothing(answer):
    got = countdown_reward("", answer, {"numbers": [15, 3, 20], "target": 32}, step_credit=0.5)
    assert got["score"] == 0.0, got
    assert got["metrics"].get("correct", 0.0) == 0.0


def test_credit_never_reaches_a_right_answer():
    """Over every two-step chain of small values on one problem, only right answers score >= the credit's cap."""
    numbers, target = [2, 5, 9], 19
    ref = {"numbers": numbers, "target": target}
    values = sorted(set(numbers) | {0, 1, 7, 10, 14, 18, 45})
    best_wrong = 0.0
    for a, b, c, op1, op2 in itertools.product(numbers, values, values, "+-*", "+-*"):
        first = OPS[op1](Fraction(a), Fraction(b))
        chain = f"{a}{op1}{b}={int(first)},{int(first)}{op2}{c}={target}"
        got = countdown_reward("", chain, ref, step_credit=0.5)
        if got["reason"] == "correct":
            assert got["score"] == 1.0
        else:
            best_wrong = max(best_wrong, got["score"])
    assert best_wrong == 0.5


def test_on_course_counts_leading_steps_only():
    steps = parse_chain("4*8=32,3-2=1,32-1=31")
    assert on_course_steps(steps, [4, 8, 3, 2], Fraction(31)) == 2
    # the first step leaves no way to 31 (4+8=12 with 3 and 2: at most 12*3*2=72, but 31 is not reachable)
    assert not _completes([Fraction(12), Fraction(3), Fraction(2)], 31)
    assert on_course_steps(parse_chain("4+8=12,3-2=1,12-1=11"), [4, 8, 3, 2], Fraction(31)) == 0
    # a later step off course stops the count there
    assert on_course_steps(parse_chain("4*8=32,3+2=5,32-5=27"), [4, 8, 3, 2], Fraction(31)) == 1


@pytest.mark.parametrize("credit", [-0.1, 1.0, 2.0])
def test_credit_outside_zero_one_is_refused(credit):
    with pytest.raises(ValueError, match="step_credit"):
        countdown_reward("", "1+2=3,3+3=6", {"numbers": [1, 2, 3], "target": 6}, step_credit=credit)
