"""benchmarks/learning_passk.py's chance floor: the expression space of a Countdown item and the uniform-guess pass@k
(BENCHMARKS.md reads the model's pass@k against it)."""
from __future__ import annotations

import math

import pytest

from benchmarks.learning_passk import chance_passk, countdown_expressions


def test_three_distinct_numbers_give_162_expressions_each_using_every_number_once():
    exprs = countdown_expressions([1, 2, 3])
    assert len(exprs) == 162  # 3! orders x 3^2 operator pairs x 3 bracketings, all distinct strings
    assert all(sorted(ch for ch in e if ch.isdigit()) == ["1", "2", "3"] for e in exprs)
    # 6 = 1+2+3 and 1*2*3: each sum or product in 6 orders x 3 bracketings; no mixed expression reaches 6
    assert sum(eval(e) == 6 for e in exprs) == 36  # noqa: S307 - digits and + - * ( ) only


def test_chance_pass_at_k_is_the_mean_over_items_of_one_minus_the_miss_rate_to_the_k():
    got = chance_passk(seed=0, items=5, ks=(1, 4))
    from benchmarks.learning_setups import SETUPS
    from rl.tasks import make_task

    rows = make_task("countdown", seed=0, **SETUPS["countdown"]["task_kwargs"]).rows("test")[:5]
    rates = []
    for row in rows:
        numbers, target = row["prompt"].rstrip(":").split("->")
        exprs = countdown_expressions([int(n) for n in numbers.split(",")])
        rates.append(sum(eval(e) == int(target) for e in exprs) / len(exprs))  # noqa: S307
    assert got["pass@1"] == pytest.approx(sum(rates) / 5)
    assert got["pass@4"] == pytest.approx(sum(1 - (1 - r) ** 4 for r in rates) / 5)
    assert all(r > 0 for r in rates)  # every generated item has a solution among the expressions
    assert not math.isclose(got["pass@1"], got["pass@4"])
