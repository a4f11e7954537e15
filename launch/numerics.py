"""CPU numerics that do not depend on the machine: the same seed, thread count and inputs give the same bits on any
x86-64 CPU with AVX2, whatever wider instructions it also has.

    env = portable_cpu_env()                       # os.environ plus the pins: for a child process or a local Ray
    subprocess.run([...], env=env)                 # its torch computes as every other AVX2 machine does
    numerics_record()                              # what a bitwise rerun must match (kept in sft.json)

Why: torch picks its kernels by the CPU it runs on. Two choices change results in the last bits (measured on an
AVX-512 machine, torch 2.13, one thread): MKL's GEMM path (every linear layer; `MKL_CBWR=AVX2` makes MKL take its
AVX2 code on any processor that has it, Intel's conditional numerical reproducibility) and ATen's own vectorised
kernels (softmax, attention; `ATEN_CPU_CAPABILITY=avx2`). Over a few hundred training steps last-bit differences
become a different model: the tiny Countdown SFT of tests/launch/test_learns_heldout.py scored 11.3% held-out on one
machine and 12.7% on an AVX-512 one, and its RL run's held-out gain went from significant to nothing.

Both are read when torch first needs them (the first MKL call, the first dispatch of a vectorised kernel), not at
import: set them before the process computes anything, i.e. for a new process. Threads are a separate matter: a
reduction split over another number of threads rounds differently, so a bitwise rerun also needs the same count.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["PORTABLE_CPU_ENV", "numerics_record", "portable_cpu_env"]

PORTABLE_CPU_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def portable_cpu_env(base: Mapping[str, str] | None = None, *, threads: int | None = 1) -> dict[str, str]:
    """`base` (default os.environ) with the portable-kernel pins and, unless `threads` is None, that many OpenMP
    threads (torch's intra-op pool, MKL's)."""
    env = dict(os.environ if base is None else base)
    env.update(PORTABLE_CPU_ENV)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    return env


def numerics_record() -> dict[str, Any]:
    """What a bitwise rerun must match besides the seed: torch's version, its thread count, the kernel set ATen
    dispatches to and MKL's reproducibility mode (unset: MKL picks by CPU). Measured on the Countdown SFT: 60 steps
    twice on one thread give identical bits, on two threads other bits; 800 steps rerun on a new machine with one
    thread score 32.2% held-out greedy where the recorded run scored 31.2%."""
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR")}
