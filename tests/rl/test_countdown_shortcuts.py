"""Countdown without one-rule shortcuts (issue 19): a target the plain sum or product of the numbers (or, asked,
any +/- combination) reaches is never generated, checked against exhaustive enumerations of expressions."""
from __future__ import annotations

import itertools
import math

import pytest

from benchmarks.learning import SETUPS
from launch.heldout import HeldoutOverlapError, check_heldout, task_train_prompts
from rl.tasks import TASKS, TaskError, make_task
from rl.tasks.countdown import SHORTCUT_RULES, evaluate, shortcut_hits


def _problem(row: dict) -> tuple[list[int], int]:
    numbers, target = row["prompt"].rstrip(":").split("->")
    return [int(n) for n in numbers.split(",")], int(target)


def _expressions(numbers: list[int], ops: str):
    """Every fully parenthesised expression using each number once, in any order, with operators from `ops`."""
    if len(numbers) == 1:
        yield str(numbers[0])
        return
    for order in set(itertools.permutations(numbers)):
        for split in range(1, len(order)):
            for left in _expressions(list(order[:split]), ops):
                for right in _expressions(list(order[split:]), ops):
                    for op in ops:
                        yield f"({left}{op}{right})"


def _additive_values(numbers: list[int]) -> set[int]:
    return {int(v) for v in map(evaluate, _expressions(numbers, "+-")) if v is not None and v.denominator == 1}


def test_shortcut_rules_match_exhaustive_enumeration():
    for numbers in ([3, 5, 7], [1, 1, 20], [2, 9], [4, 4, 4, 6]):
        assert SHORTCUT_RULES["sum"](numbers) == {sum(numbers)}
        assert SHORTCUT_RULES["product"](numbers) == {math.prod(numbers)}
        # the signed sums hold the negative ones too; every positive value is an expression's (no unary minus)
        assert {v for v in SHORTCUT_RULES["additive"](numbers) if v > 0} == {v for v in _additive_values(numbers)
                                                                              if v > 0}
    assert shortcut_hits([3, 5, 7], 15) == ["sum", "additive"]
    assert shortcut_hits([3, 5, 7], 105) == ["product"]
    assert shortcut_hits([3, 5, 7], 26) == []  # 3*7+5


def test_the_default_generator_has_the_shortcut_the_option_removes():
    """Not vacuous: without the option a fifth of the targets are the plain sum; with it, none is."""
    plain = make_task("countdown", seed=0, num_train=2000, num_test=200)
    sums = sum(t == sum(n) for n, t in map(_problem, plain.rows("train")))
    assert sums > 0.15 * 2000
    clean = make_task("countdown", seed=0, num_train=2000, num_test=200, reject_shortcuts=["sum", "product"])
    assert clean.params()["reject_shortcuts"] == ["sum", "product"]
    for row in clean.rows("train") + clean.rows("test"):
        numbers, target = _problem(row)
        assert target != sum(numbers) and target != math.prod(numbers), row
        assert evaluate(row["answer"]) == target  # the shown solution still solves it


def test_additive_rejection_leaves_only_problems_needing_a_product():
    task = make_task("countdown", seed=1, num_train=300, num_test=50, reject_shortcuts=["additive"])
    for row in task.rows("train") + task.rows("test"):
        numbers, target = _problem(row)
        assert target not in _additive_values(numbers), row
        assert "*" in row["answer"]


def test_benchmark_task_is_shortcut_free_with_600_disjoint_held_out_items():
    kwargs = SETUPS["countdown"]["task_kwargs"]
    assert set(kwargs["reject_shortcuts"]) >= {"sum", "product"} and kwargs["num_test"] == 600
    task = make_task("countdown", seed=0, **kwargs)
    test, train = task.rows("test"), task.rows("train")
    assert len(test) == 600
    for row in test + train:
        numbers, target = _problem(row)
        assert target != sum(numbers) and target != math.prod(numbers), row
    key = TASKS["countdown"].prompt_key
    assert not {key(r["prompt"]) for r in train} & {key(r["prompt"]) for r in test}
    sources = [("train", [r["prompt"] for r in train], key)]
    assert check_heldout([r["prompt"] for r in test], sources, overlap="refuse", where="t") == list(range(600))


def test_held_out_items_of_the_new_task_trained_on_by_the_old_one_are_refused():
    """A checkpoint SFT-trained on the older generator (shortcuts kept, 200 held out) has seen many of the new
    task's held-out problems: the held-out check finds them by problem key."""
    old_train = task_train_prompts("countdown", {"num_train": 5000, "num_test": 200}, 0)
    new_test = [r["prompt"] for r in make_task("countdown", seed=0, **SETUPS["countdown"]["task_kwargs"]).rows("test")]
    with pytest.raises(HeldoutOverlapError, match="evaluation prompts are also in"):
        check_heldout(new_test, [("old SFT", old_train, TASKS["countdown"].prompt_key)], overlap="refuse", where="t")


@pytest.mark.parametrize("bad", ["sum", ["sum", "max"], 3])
def test_bad_shortcut_names_fail_with_one_line(bad):
    with pytest.raises(TaskError, match="data.task_kwargs.reject_shortcuts") as err:
        make_task("countdown", reject_shortcuts=bad)
    assert "\n" not in str(err.value)
