"""Timing helpers shared by the benchmark scripts: best-of-N wall time, an optional wait for a quiet machine, a
progress log with the load average (benchmarks are run as scripts; import these as sibling modules)."""
from __future__ import annotations

import os
import sys
import time

QUIET = {"max_busy": 0.25, "timeout": 0.0, "gated": 0, "ungated": 0}


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` while this process sleeps (i.e. used by others)."""
    def snapshot():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet() -> None:
    if QUIET["timeout"] <= 0:
        return
    deadline = time.monotonic() + QUIET["timeout"]
    while time.monotonic() < deadline:
        if cpu_busy() <= QUIET["max_busy"]:
            QUIET["gated"] += 1
            return
    QUIET["ungated"] += 1


def timed(fn, repeats: int = 1):
    """(result, best wall time of `repeats` runs): the best run is the one least disturbed by other load."""
    best, out = float("inf"), None
    for _ in range(repeats):
        wait_quiet()
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True)
