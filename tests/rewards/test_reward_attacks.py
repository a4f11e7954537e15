"""Attacks on the code and math rewards found in review (issue 11 follow-up): each program or answer here scored
> 0 before its fix (the commit message records the score) and scores 0 now; cheap attacks that held stay as guards.
"""
from __future__ import annotations

import pytest

from rewards.code_reward import score_one
from rewards.sandbox import Limits, detect_isolation

ISO = detect_isolation()
needs_new_root = pytest.mark.skipif(ISO.mode == "none", reason="mode none cannot hide the host filesystem")
LIMITS = Limits(test_timeout_s=1.0, total_timeout_s=6.0, memory_mb=256)


def score(program: str, reference: dict) -> dict:
    return score_one(f"```python\n{program}\n```", reference, limits=LIMITS, allow_host_filesystem=ISO.mode == "none")


# ------------------------------------------------------------------------------- StopIteration ends the test's loop
# A test that iterates over calls (`all(map(candidate, xs))`, `for v in map(...)`) saw the program's StopIteration as
# the end of its own iteration: all([]) is True. Before the fix: 1.0 in both styles.
RAISES_STOP_ITERATION = "def is_even(x):\n    raise StopIteration\n"
ITERATING_REFS = {
    "check": {"setup": "def check(candidate):\n    assert all(map(candidate, [2, 4, 6]))\n"
                       "    for got in map(candidate, [8]):\n        assert got is True\n", "tests": ["check(is_even)"]},
    "assert": {"setup": "", "tests": ["assert all(map(is_even, [2, 4, 6]))", "assert not any(map(is_even, [1, 3]))"]},
}


@pytest.mark.parametrize("style", sorted(ITERATING_REFS))
def test_stop_iteration_from_the_program_does_not_end_the_tests_loop(style):
    result = score(RAISES_STOP_ITERATION, ITERATING_REFS[style])
    assert result["score"] == 0.0, result
    assert result["reason"].startswith("runtime_error"), result
    assert "StopIteration" in result["reason"], result
    # the same tests still pass a right program
    assert score("def is_even(x):\n    return x % 2 == 0\n", ITERATING_REFS[style])["score"] == 1.0
