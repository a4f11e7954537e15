"""Multi-digit arithmetic: prompt `"37+85="`, answer `"122"`.

Operands have between `min_digits` and `digits` digits: first a digit count uniformly, then a number uniformly
among those with that many digits (so 1-digit operands are not vanishingly rare next to 3-digit ones). `ops` picks
the operators among `+`, `-` (the larger operand first: answers are never negative) and `*`. `12+34` and `34+12`
are one problem for the split (commutative operators), so the test split holds no swapped copy of a training one.

Verifier: the response's answer line (its first non-empty line, see `base.answer_line`) must be exactly an integer
(ASCII digits, an optional minus sign) equal to the answer: `122` and ` 122` score, `122 or 123`, `x=122`,
`Y=JGDP6&UH<u` (for `2+4=`) are `bad_format`. With `partial_credit` a well-formed wrong number earns 0.5 x the
fraction of digits right (aligned on the right), a graded signal for a model that is still mostly wrong; a correct
answer always scores 1.0.
"""
from __future__ import annotations

import re
from typing import Any, Hashable

import numpy as np

from rl.tasks.base import Task, TaskError, answer_line, check_int, result

_INT = re.compile(r"-?[0-9]+")
_PROMPT = re.compile(r"([0-9]+)([-+*])([0-9]+)=")
OPS = "+-*"


def _canonical(number: str) -> str:
    """An integer's text without leading zeros or a minus on zero: equal texts <=> equal numbers."""
    digits = number.lstrip("-").lstrip("0") or "0"
    return "-" + digits if number.startswith("-") and digits != "0" else digits


def verify(response: str, reference: Any, *, partial_credit: bool = False, **_: Any) -> dict[str, Any]:
    """1.0 when the response's answer line is an integer equal to the reference, else 0 (or partial credit)."""
    want = str(reference).strip()
    if not _INT.fullmatch(want):
        return result(0.0, f"error: reference {want[:40]!r} is not an integer")
    given = answer_line(response)
    if given is None:
        return result(0.0, "no_answer", correct=0.0)
    if not _INT.fullmatch(given):
        return result(0.0, "bad_format", correct=0.0)
    if _canonical(given) == _canonical(want):  # not int(): a 5000-digit answer line would raise
        return result(1.0, "correct", correct=1.0)
    if not partial_credit:
        return result(0.0, "wrong", correct=0.0)
    same = sum(1 for a, b in zip(reversed(given), reversed(want)) if a == b)
    return result(0.5 * same / max(len(want), len(given)), "wrong", correct=0.0, digits_right=same)


class ArithmeticTask(Task):
    name = "arithmetic"
    tag = 101
    verify = staticmethod(verify)

    def __init__(self, *, seed: int = 0, digits: int = 2, min_digits: int = 1, ops: str = "+",
                 num_train: int = 2000, num_test: int = 200):
        super().__init__(seed=seed, num_train=num_train, num_test=num_test)
        self.digits = check_int("digits", digits, 1, 9)
        self.min_digits = check_int("min_digits", min_digits, 1, self.digits)
        if not isinstance(ops, str) or not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
            raise TaskError(f"data.task_kwargs.ops: {ops!r} must be a non-empty string of distinct operators "
                            f"among {OPS!r}")
        self.ops = ops
        space = self._space()
        if self.num_train + self.num_test > space:
            raise TaskError(f"data.task_kwargs: num_train {self.num_train} + num_test {self.num_test} exceeds the "
                            f"{space} distinct problems of {self.min_digits}..{self.digits}-digit {ops!r} arithmetic")

    def _space(self) -> int:
        numbers = 10 ** self.digits - (10 ** (self.min_digits - 1) if self.min_digits > 1 else 0)
        unordered = numbers * (numbers + 1) // 2
        return len(self.ops) * unordered  # every operator's problems are unordered pairs (see `draw`)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "digits": self.digits, "min_digits": self.min_digits, "ops": self.ops}

    def _operand(self, rng: np.random.Generator) -> int:
        n = int(rng.integers(self.min_digits, self.digits + 1))
        lo = 0 if n == 1 else 10 ** (n - 1)
        return int(rng.integers(lo, 10 ** n))

    @staticmethod
    def prompt_key(prompt: str) -> Hashable | None:
        match = _PROMPT.fullmatch(prompt.strip())
        if match is None:
            return None
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return op, min(a, b), max(a, b)

    def draw(self, rng: np.random.Generator) -> tuple[Hashable, dict]:
        op = self.ops[int(rng.integers(len(self.ops)))]
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        key = (op, min(a, b), max(a, b))
        return key, {"prompt": f"{a}{op}{b}=", "answer": str(value)}
