"""Countdown: reach a target with given numbers. Prompt `"3,5,7->22:"`, answer `"3*5+7"` (one solution).

Generation: `num_numbers` numbers in 1..`max_number` (repeats allowed), combined in a random order by a random
binary expression with `+ - *` (and `/` when `division` and the division is exact); kept when the value is an
integer in 1..`max_target`. The problem's key is (sorted numbers, target), so no test problem reappears in
training with its numbers reordered.

Verifier (TinyZero / d1 rules): the response's answer line (its first non-empty line, `base.answer_line`) is an
expression, optionally followed by `= <target>`: the expression may contain only ASCII integers, `+ - * /`,
parentheses and spaces; it must use exactly the reference's numbers, each once, and evaluate (exactly, in
fractions) to the target. A line that claims another value (`3*5+7 = 23`) or has anything else after `=` is
`malformed`. The reference is self-contained: a solution expression (its
numbers and value give the problem) or a JSON object `{"numbers": [...], "target": N}` (a user's own file).
`format_score` is paid for a well-formed equation on the right numbers that misses the target (default 0).

Worked answers (`answer_format: steps`): the SFT answer writes each intermediate result, one binary step at a time,
`19-9=10,10+3=13` instead of `19-9+3`, so a model need not do the arithmetic silently. The verifier accepts such a
chain in either format (it is a derivation like any other): every step `a op b = c` must be true (exactly, in
fractions), each operand must be a given number or an earlier step's result not used yet, there must be exactly
one step fewer than numbers (so every number is used once), and the last result is the answer. A false step is
`false_step` and scores 0 (no format credit: a chain that lies about its arithmetic is not well formed). The problems
and their keys are the same in every format: only the shown solution differs.

Search answers (`answer_format: search`): worked answers where about half of the SFT answers first try a dead end,
written out truly and rejected with `;`: `19-3=16,16+10=26;19-9=10,10+3=13`. A worked-answer model that picks a first
step with no way on forces its last step onto the target (`16+10=13`, a lie the verifier refuses: issue 19, 306 of
the 341 misses at the SFT start); this format shows it how to finish honestly and try again. Measured, it does not
help: the SFT model's retries are mostly forced too, and RL prunes them (BENCHMARKS.md ## Learning). The dead end
is a true first step that no chain of true steps can complete to the target (checked by search), its last step the
reachable value closest to the target. The verifier reads the attempts separated by `;`: every one must be a true
chain on the given numbers (a false step anywhere scores 0), and the last one is the answer; earlier ones earn
nothing, so trying more costs response length and buys no credit.

Step credit (`step_credit`, default 0: off): a process reward for worked answers, measured for issue 19. The
worked-answer model's misses are a first step with no way on, or a right first step and a botched last one
(BENCHMARKS.md). A wrong answer that is one chain of one step fewer than numbers earns `step_credit` x k /
(numbers - 2), where k counts its leading steps before the last that are true and leave values from which the
target is still reachable, when every operand of the chain is a given number or an earlier result not used yet (a
whole attempt); a right answer earns 1 and `step_credit` < 1, so solving always pays more than any partial chain.
Search answers (several attempts) and bare expressions earn none. Measured, it does not help: 0.5 gained +7.9 (sd
3.2) over 3 seeds against +10.2 (sd 0.9) without it (BENCHMARKS.md ## Learning).

Shortcuts (`reject_shortcuts`): a problem whose target one fixed rule reaches without any search is answered by
that rule whatever the problem, and RL learns the rule instead of the task (issue 19: 19.5% of the default
generator's targets are the plain sum of the numbers; TraceRL turned a model answering "sum" on 45 of 200 held-out
items into one doing so on 80, all its gain). Named rules, each a set of values reachable from the numbers alone:
`sum` (all numbers added), `product` (all multiplied): the two answers that need neither an operator choice nor
an order; `additive` (any signs: every target reachable with + and - alone, the sum included). A drawn problem
whose target is in a listed rule's set is redrawn. No rule set removes every one-template answer: with three
numbers the ~19 distinct templates over sorted roles (e.g. largest + smallest - middle) each cover a share
(BENCHMARKS.md ## Learning, issue 19 shortcut-free task).
"""
from __future__ import annotations

import ast
import itertools
import json
import re
from collections import Counter
from collections.abc import Hashable
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from rl.tasks.base import Task, TaskError, answer_line, check_int, result

_ALLOWED = re.compile(r"^[0-9+\-*/() ]+$")
_NUMBER = re.compile(r"[0-9]+")
_INT = re.compile(r"-?[0-9]+")
_PROMPT = re.compile(r"([0-9]+(?:,[0-9]+)*)->([0-9]+):")
_STEP = re.compile(r"(-?[0-9]+)([+\-*/])(-?[0-9]+)=(-?[0-9]+)")
ANSWER_FORMATS = ("expression", "steps", "search")
SEARCH_REJECTED_SHARE = 0.5  # share of search-format answers that open with a rejected dead end
SEARCH_MAX_NUMBERS = 4  # the dead-end check searches every completion: cheap up to four numbers
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}
_SYMBOL = {"+": ast.Add, "-": ast.Sub, "*": ast.Mult, "/": ast.Div}
MAX_EXPRESSION_CHARS = 200


def _signed_sums(numbers: list[int]) -> set[int]:
    sums = {0}
    for n in numbers:
        sums = {s + n for s in sums} | {s - n for s in sums}
    return sums


# Shortcut rules: numbers -> the targets the rule reaches (see the module docstring).
SHORTCUT_RULES = {
    "sum": lambda numbers: {sum(numbers)},
    "product": lambda numbers: {int(np.prod(numbers, dtype=object))},
    "additive": _signed_sums,
}


def shortcut_hits(numbers: list[int], target: int, rules: tuple[str, ...] = tuple(SHORTCUT_RULES)) -> list[str]:
    """The named shortcut rules that reach `target` from `numbers`."""
    return [name for name in rules if target in SHORTCUT_RULES[name](list(numbers))]


def evaluate(expression: str) -> Fraction | None:
    """Exact value of an arithmetic expression of non-negative integers (no unary operators), or None when it is
    malformed, uses anything else, or divides by zero. Parsed with `ast`, never `eval`."""
    if len(expression) > MAX_EXPRESSION_CHARS or not _ALLOWED.match(expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("unsupported syntax")

    try:
        return value(tree.body)
    except (ValueError, ZeroDivisionError):
        return None


def parse_chain(line: str) -> list[tuple[int, str, int, int]] | None:
    """The steps `(a, op, b, c)` of a worked answer `a op b=c,c op d=e` (spaces ignored), or None when the line is
    not a chain of at least one such step. Says nothing about whether the steps are true (see `chain_value`)."""
    text = line.replace(" ", "")
    if len(text) > MAX_EXPRESSION_CHARS or "," not in text and text.count("=") != 1:
        return None
    steps = []
    for part in text.split(","):
        match = _STEP.fullmatch(part)
        if match is None:
            return None
        a, op, b, c = match.groups()
        steps.append((int(a), op, int(b), int(c)))
    return steps


def _step_true(a: int, op: str, b: int, c: int) -> bool:
    if op == "/" and b == 0:
        return False
    return _BINOPS[_SYMBOL[op]](Fraction(a), Fraction(b)) == c


def chain_value(steps: list[tuple[int, str, int, int]], numbers: list[int]) -> tuple[str, int | None]:
    """("ok", last result) when every step is true and the chain uses exactly `numbers`, each once (every operand
    is a number or an earlier result not yet used, one step fewer than numbers); else (reason, None).
    Equal values are interchangeable, so the pool is a multiset of values: which of two equal 7s an operand
    consumes does not change what remains."""
    if not all(_step_true(*step) for step in steps):
        return "false_step", None
    if len(steps) != len(numbers) - 1 or None in _pools(steps, numbers):
        return "wrong_numbers", None
    return "ok", steps[-1][3]


def _pools(steps: list[tuple[int, str, int, int]], numbers: list[int]) -> list[Counter | None]:
    """The values left after each step (its operands taken from `numbers` and earlier written results, its result
    added), a multiset; the list ends with None at the first step whose operand is not available."""
    pool, after = Counter(numbers), []
    for a, _, b, c in steps:
        for operand in (a, b):
            if pool[operand] <= 0:
                return after + [None]
            pool[operand] -= 1
        pool[c] += 1
        after.append(pool.copy())
    return after


def _step_results(a: Fraction, b: Fraction, ops: str = "+-*/") -> list[tuple[str, Fraction, Fraction, Fraction]]:
    """The true integer steps `(op, x, y, x op y)` over two values, both orders (what a chain may write next)."""
    steps = []
    for x, y in ((a, b), (b, a)):
        for op in ops:
            if op == "/" and y == 0:
                continue
            value = _BINOPS[_SYMBOL[op]](x, y)
            if value.denominator == 1:
                steps.append((op, x, y, value))
    return steps


@lru_cache(maxsize=65536)
def reachable(pool: tuple[Fraction, ...], target: Fraction) -> bool:
    """Whether some chain of true integer steps over all of `pool` (sorted) ends at `target`."""
    if len(pool) == 1:
        return pool[0] == target
    for i, j in itertools.combinations(range(len(pool)), 2):
        rest = pool[:i] + pool[i + 1:j] + pool[j + 1:]
        if any(reachable(tuple(sorted(rest + (value,))), target) for *_, value in _step_results(pool[i], pool[j])):
            return True
    return False


def dead_end(rng: np.random.Generator, numbers: list[int], target: int, ops: str) -> list[str] | None:
    """A true chain on `numbers` a solver would try and reject: its first step leaves a pool no chain completes to
    `target` (for two numbers, any step that misses), later steps drawn at random, the last one the value closest
    to `target`. None when 20 draws find no such first step."""
    for _ in range(20):
        pool, steps = [Fraction(n) for n in numbers], []
        while len(pool) > 2:
            i, j = (int(k) for k in rng.choice(len(pool), size=2, replace=False))
            options = _step_results(pool[i], pool[j], ops)
            op, x, y, value = options[int(rng.integers(len(options)))]
            pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [value]
            if not steps and reachable(tuple(sorted(pool)), Fraction(target)):
                break  # this first step can still reach the target: not a dead end
            steps.append(f"{x}{op}{y}={value}")
        else:
            misses = [s for s in _step_results(pool[0], pool[1], ops) if s[3] != target]
            if misses:
                op, x, y, value = min(misses, key=lambda s: abs(s[3] - target))
                return steps + [f"{x}{op}{y}={value}"]
    return None


def on_course_steps(steps: list[tuple[int, str, int, int]], numbers: list[int], target: Fraction) -> int:
    """How many of a worked answer's steps before its last keep it on course: each true and leaving values from
    which some chain of true steps still reaches `target` (`reachable`), counted from the first step until one is
    not. 0 unless the chain is a whole attempt on the given numbers: one step fewer than numbers, every operand a
    given number or an earlier (written) result not used yet. The last step is not counted: it either reaches the
    target (the answer is right) or it does not."""
    pools = _pools(steps, numbers)
    if len(steps) != len(numbers) - 1 or None in pools:
        return 0
    on_course = 0
    for step, pool in zip(steps[:-1], pools):
        if not (_step_true(*step) and reachable(tuple(sorted(Fraction(v) for v in pool.elements())), target)):
            break
        on_course += 1
    return on_course


def chain_numbers(steps: list[tuple[int, str, int, int]]) -> list[int]:
    """The given numbers of a worked solution: its operands less the intermediate results (as multisets; the same
    whichever equal value an operand is taken to be)."""
    operands = Counter(x for a, _, b, _ in steps for x in (a, b))
    operands.subtract(Counter(c for *_, c in steps[:-1]))
    if any(count < 0 for count in operands.values()):
        raise ValueError("reference chain uses a result it never computes")
    return sorted(operands.elements())


def parse_reference(reference: Any) -> tuple[list[int], Fraction]:
    """(numbers, target) from a solution expression or a `{"numbers": [...], "target": N}` object / JSON string."""
    ref = reference
    if isinstance(ref, str) and ref.strip().startswith("{"):
        try:
            ref = json.loads(ref)
        except json.JSONDecodeError as err:
            raise ValueError(f"reference is not valid JSON ({err.msg})") from None
    if isinstance(ref, dict):
        numbers, target = ref.get("numbers", ref.get("nums")), ref.get("target")
        if not isinstance(numbers, list) or not all(isinstance(n, int) for n in numbers) or not isinstance(target, int):
            raise ValueError("reference object needs integer list 'numbers' and integer 'target'")
        return sorted(numbers), Fraction(target)
    expression = str(ref).strip().rpartition(";")[2]  # a search answer: its last attempt is the solution
    steps = parse_chain(expression)
    if steps is not None:
        if not all(_step_true(*step) for step in steps):
            raise ValueError(f"reference {expression[:40]!r} has a false step")
        return chain_numbers(steps), Fraction(steps[-1][3])
    target = evaluate(expression)
    if target is None:
        raise ValueError(f"reference {expression[:40]!r} is not an arithmetic expression")
    return sorted(int(n) for n in _NUMBER.findall(expression)), target


def _equation(line: str, target: Fraction) -> str:
    """The expression of an answer line, "" when the line is not `expression [= target]`."""
    expression, equals, claimed = line.partition("=")
    claimed = claimed.strip()
    # the length cap first: int() of a 5000-digit string raises (Python's int-from-text limit)
    if equals and not (len(claimed) <= 30 and _INT.fullmatch(claimed) and Fraction(int(claimed)) == target):
        return ""
    return expression.strip()


def verify(response: str, reference: Any, *, format_score: float = 0.0, step_credit: float = 0.0,
           **_: Any) -> dict[str, Any]:
    """1.0 for an equation using exactly the reference's numbers (each once) that evaluates to its target.
    step_credit: a wrong single-chain worked answer earns step_credit x (on-course steps / steps before the last)
    when that beats what it earns otherwise (module doc, "Step credit")."""
    if not 0.0 <= step_credit < 1.0:
        raise ValueError(f"countdown reward: step_credit must be in [0, 1), got {step_credit}")
    try:
        numbers, target = parse_reference(reference)
    except ValueError as err:
        return result(0.0, f"error: {err}")
    line = answer_line(response)
    if line is None:
        return result(0.0, "no_answer", correct=0.0)
    chains = [parse_chain(part) for part in line.split(";")] if "," in line or ";" in line else []
    if ";" in line and (len(line) > MAX_EXPRESSION_CHARS or None in chains):
        return result(0.0, "malformed", correct=0.0)
    if chains and None not in chains:  # a worked answer: one chain, or attempts of which the last is the answer
        for steps in chains:
            reason, value = chain_value(steps, numbers)
            if value is None:
                break
        if value == target:
            return result(1.0, "correct", correct=1.0)
        score, why = (0.0, reason) if value is None else (float(format_score), "wrong")
        if step_credit and len(chains) == 1 and len(numbers) > 2:
            on_course = on_course_steps(chains[0], numbers, target)
            score = max(score, step_credit * on_course / (len(numbers) - 2))
            return result(score, why, correct=0.0, on_course=on_course)
        return result(score, why, correct=0.0)
    equation = _equation(line, target)
    value = evaluate(equation) if equation else None
    if value is None:
        return result(0.0, "malformed", correct=0.0)
    if sorted(int(n) for n in _NUMBER.findall(equation)) != numbers:
        return result(0.0, "wrong_numbers", correct=0.0)
    if value == target:
        return result(1.0, "correct", correct=1.0)
    return result(float(format_score), "wrong", correct=0.0)


class CountdownTask(Task):
    name = "countdown"
    tag = 202
    verify = staticmethod(verify)

    def __init__(self, *, seed: int = 0, num_numbers: int = 3, max_number: int = 20, max_target: int = 100,
                 division: bool = False, num_train: int = 2000, num_test: int = 200,
                 reject_shortcuts: list[str] | tuple[str, ...] = (), answer_format: str = "expression"):
        super().__init__(seed=seed, num_train=num_train, num_test=num_test)
        self.num_numbers = check_int("num_numbers", num_numbers, 2, 6)
        self.max_number = check_int("max_number", max_number, 1, 999)
        self.max_target = check_int("max_target", max_target, 1)
        if not isinstance(division, bool):
            raise TaskError(f"data.task_kwargs.division: expected true or false, got {division!r}")
        self.division = division
        if isinstance(reject_shortcuts, str) or not isinstance(reject_shortcuts, (list, tuple)) or any(
                rule not in SHORTCUT_RULES for rule in reject_shortcuts):
            raise TaskError(f"data.task_kwargs.reject_shortcuts: expected a list of {', '.join(SHORTCUT_RULES)}, "
                            f"got {reject_shortcuts!r}")
        self.reject_shortcuts = tuple(dict.fromkeys(reject_shortcuts))
        if answer_format not in ANSWER_FORMATS:
            raise TaskError(f"data.task_kwargs.answer_format: expected one of {', '.join(ANSWER_FORMATS)}, "
                            f"got {answer_format!r}")
        if answer_format == "search" and self.num_numbers > SEARCH_MAX_NUMBERS:
            raise TaskError(f"data.task_kwargs.num_numbers: answer_format search takes at most {SEARCH_MAX_NUMBERS} "
                            f"numbers, got {self.num_numbers}")
        self.answer_format = answer_format

    def params(self) -> dict[str, Any]:
        return {**super().params(), "num_numbers": self.num_numbers, "max_number": self.max_number,
                "max_target": self.max_target, "division": self.division,
                "reject_shortcuts": list(self.reject_shortcuts), "answer_format": self.answer_format}

    def _combine(self, rng: np.random.Generator,
                 terms: list[tuple[str, Fraction, int]]) -> tuple[str, Fraction, list[str]]:
        """Join the terms (text, value, precedence) into one expression by random binary merges; also the worked
        steps (`a op b=c`, in merge order: every operand is computed before it is used)."""
        ops = "+-*/" if self.division else "+-*"
        steps = []
        while len(terms) > 1:
            i = int(rng.integers(len(terms) - 1))
            (lt, lv, lp), (rt, rv, rp) = terms[i], terms[i + 1]
            op = ops[int(rng.integers(len(ops)))]
            if op == "/" and (rv == 0 or (lv / rv).denominator != 1):
                op = "+"
            prec = 1 if op in "+-" else 2
            # Parenthesise a child that binds looser than this operator, and a right child of - or / at equal
            # precedence (a-(b-c) is not a-b-c); the text then means exactly this tree.
            left = f"({lt})" if lp < prec else lt
            right = f"({rt})" if rp < prec or (rp == prec and op in "-/") else rt
            value = _BINOPS[_SYMBOL[op]](lv, rv)
            steps.append(f"{lv}{op}{rv}={value}")  # Fraction prints an integer value as the integer
            terms[i:i + 2] = [(f"{left}{op}{right}", value, prec)]
        return terms[0][0], terms[0][1], steps

    @staticmethod
    def prompt_key(prompt: str) -> Hashable | None:
        match = _PROMPT.fullmatch(prompt.strip())
        if match is None:
            return None
        return tuple(sorted(int(n) for n in match.group(1).split(","))), int(match.group(2))

    def draw(self, rng: np.random.Generator) -> tuple[Hashable, dict]:
        while True:
            numbers = [int(n) for n in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
            text, value, steps = self._combine(rng, [(str(n), Fraction(n), 3) for n in numbers])
            if value.denominator == 1 and 1 <= value <= self.max_target and not (
                    self.reject_shortcuts and shortcut_hits(numbers, int(value), self.reject_shortcuts)):
                break
        target = int(value)
        shown = ",".join(str(numbers[i]) for i in rng.permutation(len(numbers)))  # not in the solution's order
        answer = ",".join(steps) if self.answer_format in ("steps", "search") else text
        if self.answer_format == "search":
            # The dead end's own generator, seeded by the problem: drawing from `rng` would change every later problem.
            side = np.random.Generator(np.random.PCG64([self.seed, self.tag, target, *sorted(numbers)]))
            rejected = dead_end(side, numbers, target, "+-*/" if self.division else "+-*") \
                if side.random() < SEARCH_REJECTED_SHARE else None
            answer = f"{','.join(rejected)};{answer}" if rejected else answer
        return (tuple(sorted(numbers)), target), {"prompt": f"{shown}->{target}:", "answer": answer}
