"""Process memory readings shared by the benchmark scripts (Linux): RSS and its peak (VmHWM) from /proc/self/status,
the peak reset through /proc/self/clear_refs (benchmarks are run as scripts; import these as sibling modules)."""
from __future__ import annotations


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS, so the next reading is the peak from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"
