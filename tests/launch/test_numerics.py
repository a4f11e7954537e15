"""Portable CPU numerics (launch/numerics.py): a child process under `portable_cpu_env` computes exactly what a
machine whose widest instructions are AVX2 computes, here forced by other knobs (MKL_ENABLE_INSTRUCTIONS caps MKL's
code path, ATEN_CPU_CAPABILITY ATen's). On an AVX-512 machine the default path gives other bits for the linear layer
and the softmax (measured), so a pin that is missing or not taking effect fails the comparison there; on an AVX2-only
machine all three agree."""
from __future__ import annotations

import json
import subprocess
import sys

from launch.numerics import PORTABLE_CPU_ENV, portable_cpu_env

PROBE = """
import hashlib, json, torch
from launch.numerics import numerics_record
g = torch.Generator().manual_seed(0)
x, w = torch.randn(64, 96, generator=g), torch.randn(128, 96, generator=g)
lin = torch.nn.functional.linear(x, w)
q = torch.randn(1, 2, 40, 16, generator=g)
out = {"linear": lin, "softmax": torch.softmax(lin, -1),
       "attention": torch.nn.functional.scaled_dot_product_attention(q, q, q)}
print(json.dumps({"bits": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in out.items()},
                  "numerics": numerics_record()}))
"""


def probe(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_portable_env_computes_what_an_avx2_machine_computes():
    pinned = probe(portable_cpu_env())
    plain = {k: v for k, v in portable_cpu_env().items() if k not in PORTABLE_CPU_ENV}
    avx2_only = probe({**plain, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert pinned["bits"] == avx2_only["bits"]
    assert pinned["numerics"]["cpu_capability"] == "AVX2" and pinned["numerics"]["mkl_cbwr"] == "AVX2"
    assert pinned["numerics"]["threads"] == 1
    assert probe(portable_cpu_env())["bits"] == pinned["bits"]  # and it is deterministic


def test_portable_env_keeps_the_callers_environment_and_sets_threads():
    env = portable_cpu_env({"PATH": "/bin", "OMP_NUM_THREADS": "8"}, threads=2)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", **PORTABLE_CPU_ENV}
    assert portable_cpu_env({"OMP_NUM_THREADS": "8"}, threads=None)["OMP_NUM_THREADS"] == "8"
