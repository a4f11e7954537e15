"""Countdown with worked answers (`answer_format: steps`, `19-9=10,10+3=13`): the verifier pays a chain exactly when
it is a true derivation of the target from the given numbers, checked against a naive search over which earlier
value each operand is, over every chain of a small grid (true and false steps, right and wrong numbers)."""
from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from benchmarks.learning_setups import SETUPS, generator
from rl.tasks import TaskError, countdown_reward, make_task
from rl.tasks.countdown import evaluate


def _is_derivation(chain: str, numbers: list[int], target: int) -> bool:
    """Naive oracle from the rules: each step `a op b=c` is true, takes two distinct values still available (a given
    number, each given once, or an earlier result), adds c; the last value left uses every number once and is the
    target. Values carry the numbers they were built from and every choice among equal values is tried."""
    try:
        steps = []
        for part in chain.split(","):
            left, c = part.split("=")
            for i, ch in enumerate(left):
                if i > 0 and ch in "+-*/" and left[i - 1].isdigit():
                    steps.append((int(left[:i]), ch, int(left[i + 1:]), int(c)))
                    break
            else:
                return False
    except ValueError:
        return False

    def true(a: int, op: str, b: int, c: int) -> bool:
        if op == "/":
            return b != 0 and Fraction(a, b) == c
        return {"+": a + b, "-": a - b, "*": a * b}[op] == c

    def search(available: list[tuple[int, tuple[int, ...]]], rest: list) -> bool:
        if not rest:
            return len(available) == 1 and available[0][0] == target and available[0][1] == tuple(sorted(numbers))
        a, op, b, c = rest[0]
        if not true(a, op, b, c):
            return False
        for i, j in itertools.permutations(range(len(available)), 2):
            if available[i][0] == a and available[j][0] == b:
                left = [v for k, v in enumerate(available) if k not in (i, j)]
                merged = (c, tuple(sorted(available[i][1] + available[j][1])))
                if search(left + [merged], rest[1:]):
                    return True
        return False

    return search([(n, (n,)) for n in numbers], steps)


def _grid_chains(numbers: list[int]):
    """Two-step chains whose operands are given numbers, results, or near misses; true results or off by one."""
    values = sorted(set(numbers) | {0, 1, numbers[0] + 1})
    for a, b, op1 in itertools.product(values, values, "+-*/"):
        first = evaluate(f"{a}{op1}{b}") if b or op1 != "/" else None
        if first is None or first.denominator != 1:
            continue
        for c1 in (int(first), int(first) + 1):
            later = sorted(set(values) | {c1})
            for x, y, op2 in itertools.product(later, later, "+-*"):
                second = int(evaluate(f"({x}){op2}({y})".replace("(-", "(0-")))
                for c2 in (second, second - 1):
                    yield f"{a}{op1}{b}={c1},{x}{op2}{y}={c2}"


@pytest.mark.parametrize("numbers,target", [([3, 4, 7], 14), ([2, 2, 5], 9), ([3, 6, 2], 9)])
def test_verifier_pays_exactly_the_true_derivations(numbers, target):
    reference = {"numbers": numbers, "target": target}
    paid = checked = 0
    for chain in _grid_chains(numbers):
        score = countdown_reward("", chain, reference)["score"]
        assert (score == 1.0) == _is_derivation(chain, numbers, target), chain
        paid += score == 1.0
        checked += 1
    assert checked > 20_000 and paid >= 2  # the grid holds right answers, not only wrong ones


@pytest.mark.parametrize("response,reason", [
    ("3+4=7,7+7=14", "correct"),
    ("3+4=7, 7 + 7 = 14", "correct"),            # spaces are ignored
    ("3+4=7,7*7=49", "wrong"),                   # a true derivation of another number: format credit only
    ("3+4=8,8+6=14", "false_step"),              # a false step scores nothing, whatever follows
    ("3+4=7,7+7=15", "false_step"),
    ("7+7=14,3+4=7", "wrong_numbers"),           # a result used before it is computed
    ("3+4=7,7+7=14,14-0=14", "wrong_numbers"),   # a number not given (0)
    ("3+4=7,7*1=7,7+7=14", "wrong_numbers"),     # one step more than numbers allow
    ("3+7=10,10+4=14,", "malformed"),            # trailing comma
    ("3+4=7,7+7=14 so", "malformed"),
    ("3+4=7,7+7=٤١", "malformed"),               # non-ASCII digits
    ("3+4=7,+7+7=14", "malformed"),              # unary plus
    ("3+4=7,7+7=14=14", "malformed"),
    ("3/0=0,7+4=11", "false_step"),               # division by zero is never true
])
def test_hostile_chains(response, reason):
    got = countdown_reward("", response + "\n14", {"numbers": [3, 4, 7], "target": 14}, format_score=0.1)
    assert got["reason"] == reason
    assert got["score"] == {"correct": 1.0, "wrong": 0.1}.get(reason, 0.0)


def test_worked_answers_are_the_same_problems_and_verify():
    kwargs = {**SETUPS["countdown_steps"]["task_kwargs"], "num_train": 800, "num_test": 200}
    steps = make_task(generator("countdown_steps"), seed=0, **kwargs)
    plain = make_task("countdown", seed=0, **{k: v for k, v in kwargs.items() if k != "answer_format"})
    for split in ("train", "test"):
        worked, expressions = steps.rows(split), plain.rows(split)
        assert [r["prompt"] for r in worked] == [r["prompt"] for r in expressions]  # same items, same held-out set
        for w, e in zip(worked, expressions):
            assert w["answer"].count(",") == 1 and "(" not in w["answer"]
            numbers, target = e["prompt"].rstrip(":").split("->")
            assert _is_derivation(w["answer"], [int(n) for n in numbers.split(",")], int(target))
            # a worked reference and an expression reference describe the same problem
            assert countdown_reward(w["prompt"], e["answer"], w["answer"])["score"] == 1.0
            assert countdown_reward(w["prompt"], w["answer"], e["answer"])["score"] == 1.0
    assert max(len(r["answer"]) for r in steps.rows("train")) < SETUPS["countdown_steps"]["max_tokens"]


def test_bad_answer_format_and_reference():
    with pytest.raises(TaskError, match="answer_format"):
        make_task("countdown", answer_format="worked")
    assert countdown_reward("", "3+4=7,7+7=14", "3+4=8,8+6=14")["reason"].startswith("error: reference")
