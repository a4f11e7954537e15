"""Countdown search answers (`answer_format: search`, `3+11=14,9+14=23;3*11=33,33+9=42`): about half of the SFT answers
first try a dead end and reject it. Checked against a naive enumeration of every expression over a pool (is a dead
end really one?), the worked-answer oracle of test_countdown_steps (is each attempt a true chain on the numbers?),
and hostile multi-attempt answers (only the last attempt is paid, any false attempt scores 0)."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from benchmarks.learning_setups import SETUPS, generator
from rl.tasks import TaskError, countdown_reward, make_task
from rl.tasks.countdown import dead_end, reachable
from tests.rl.test_countdown_steps import _is_derivation


def _values(pool: tuple[int, ...]) -> set[Fraction]:
    """Every value an expression tree over all of `pool` (each once) reaches with integer intermediate results:
    split the pool into two non-empty parts every way, combine every value of one with every value of the other."""
    if len(pool) == 1:
        return {Fraction(pool[0])}
    out = set()
    indices = range(len(pool))
    for size in range(1, len(pool)):
        for left in itertools.combinations(indices, size):
            right = [i for i in indices if i not in left]
            for a in _values(tuple(pool[i] for i in left)):
                for b in _values(tuple(pool[i] for i in right)):
                    for value in (a + b, a - b, a * b, a / b if b else None):
                        if value is not None and value.denominator == 1:
                            out.add(value)
    return out


def _steps(chain: str) -> list[tuple[int, str, int, int]]:
    parts = []
    for step in chain.split(","):
        left, c = step.split("=")
        i = next(i for i, ch in enumerate(left) if i > 0 and ch in "+-*/" and left[i - 1].isdigit())
        parts.append((int(left[:i]), left[i], int(left[i + 1:]), int(c)))
    return parts


def test_reachable_matches_enumeration():
    rng = np.random.default_rng(0)
    checked = hits = 0
    for _ in range(150):
        pool = tuple(sorted(int(n) for n in rng.integers(-3, 21, size=int(rng.integers(1, 4)))))
        values = _values(pool)
        for target in range(-5, 60):
            assert reachable(tuple(Fraction(n) for n in pool), Fraction(target)) == (Fraction(target) in values)
            hits += Fraction(target) in values
            checked += 1
    assert checked > 9000 and 500 < hits < checked  # reachable and unreachable targets both seen


@pytest.mark.parametrize("seed", range(3))
def test_dead_ends_are_true_and_leave_no_way_to_the_target(seed):
    task = make_task("countdown", seed=seed, num_train=600, num_test=10, answer_format="search", num_numbers=3)
    rejected = 0
    for row in task.rows("train"):
        numbers, target = row["prompt"].rstrip(":").split("->")
        numbers, target = [int(n) for n in numbers.split(",")], int(target)
        *tries, solution = row["answer"].split(";")
        assert _is_derivation(solution, numbers, target), row
        for attempt in tries:
            rejected += 1
            steps = _steps(attempt)
            assert _is_derivation(attempt, numbers, steps[-1][3]) and steps[-1][3] != target, row
            a, _, b, c = steps[0]
            rest = list(numbers)
            rest.remove(a), rest.remove(b)
            assert target not in _values(tuple(rest + [c])), row  # no completion of the first step reaches it
            # the last step is the closest of the steps the task's operators (+ - *, no division) make of the two
            # values left
            x, _, y, last = steps[-1]
            closest = min(abs(v - target) for v in (x + y, x - y, y - x, x * y))
            assert abs(last - target) == closest, row
    assert 0.4 < rejected / 600 < 0.6  # SEARCH_REJECTED_SHARE = 0.5 (a few problems have no dead end)


def test_search_answers_are_the_same_problems():
    kwargs = {**SETUPS["countdown_search"]["task_kwargs"], "num_train": 800, "num_test": 200}
    search = make_task(generator("countdown_search"), seed=0, **kwargs)
    steps = make_task("countdown", seed=0, **{**kwargs, "answer_format": "steps"})
    for split in ("train", "test"):
        a, b = search.rows(split), steps.rows(split)
        assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
        assert [r["answer"].rpartition(";")[2] for r in a] == [r["answer"] for r in b]
        for row in a:  # a search reference names the same problem as its last attempt
            assert countdown_reward(row["prompt"], row["answer"], row["answer"])["score"] == 1.0
            assert countdown_reward(row["prompt"], row["answer"].rpartition(";")[2], row["answer"])["score"] == 1.0
    assert [r["answer"] for r in search.rows("train")] == [
        r["answer"] for r in make_task("countdown", seed=0, **kwargs).rows("train")]  # deterministic
    assert max(len(r["answer"]) for r in search.rows("train")) < SETUPS["countdown_search"]["max_tokens"]


@pytest.mark.parametrize("response,reason", [
    ("3*7=21,21-4=17;3+4=7,7+7=14", "correct"),           # a rejected attempt, then the answer
    ("3+4=7,7+7=14;3+4=7,7+7=14", "correct"),             # repeating a right answer changes nothing
    ("3+4=7,7+7=14;3*7=21,21-4=17", "wrong"),             # only the last attempt is the answer
    ("3*7=21,21-4=18;3+4=7,7+7=14", "false_step"),        # a false step in any attempt scores 0
    ("3*7=21,21-5=16;3+4=7,7+7=14", "wrong_numbers"),     # so does an attempt on other numbers
    ("3+4=7,7+7=14;", "malformed"),                       # an empty attempt
    (";3+4=7,7+7=14", "malformed"),
    ("3+4+7;3+4=7,7+7=14", "malformed"),                   # attempts are chains, not expressions
    ("3+4=7;7+7=14", "wrong_numbers"),                     # each attempt is a whole chain
    (";".join(["3*7=21,21-4=17"] * 14) + ";3+4=7,7+7=14", "malformed"),  # over the line cap
])
def test_hostile_attempts(response, reason):
    got = countdown_reward("", response + "\n14", {"numbers": [3, 4, 7], "target": 14}, format_score=0.1)
    assert got["reason"] == reason
    assert got["score"] == {"correct": 1.0, "wrong": 0.1}.get(reason, 0.0)


def test_search_takes_at_most_four_numbers():
    make_task("countdown", num_numbers=4, answer_format="search", num_train=20, num_test=5).rows("train")
    with pytest.raises(TaskError, match="num_numbers"):
        make_task("countdown", num_numbers=5, answer_format="search")


def test_dead_end_for_two_numbers_is_the_closest_miss():
    steps = dead_end(np.random.default_rng(0), [3, 4], 12, "+-*")
    assert steps == ["3+4=7"]  # 12 = 3*4; the closest of the other true steps (7, -1, 1)
