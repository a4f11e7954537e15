"""Host syncs and host->device copies per decoding step, and tokens/s, per decoder and remasking policy (issue 16).

Tiny random models (rollout/models/tiny.py): SDAR-like block decoding (cached `block`, uncached `none`), LLaDA and
Dream full attention (`none`, `prefix`, `dual`, block 8). 8 rows x 32 tokens, temperature 1, for the counts;
16 rows x 64 tokens for speed, timed as process CPU time (best of 5), which a loaded shared box disturbs less than
wall time.

    python benchmarks/decoding_syncs.py                 # counts only (~20 s on CPU)
    python benchmarks/decoding_syncs.py --speed         # and tokens/s
    python benchmarks/decoding_syncs.py --device cuda   # the same on a GPU (wall time there)
    python benchmarks/decoding_syncs.py --slots 3       # under a memory budget of 3 cache rows for the 8 requests
                                                        # (cached block: admissions into freed slots, evictions)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from rollout.decoding.sync_counter import count_host_syncs
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams

# The cases are the host-sync tests' (tests/rollout/decoding_cases.py): run as a script, only benchmarks/ is on
# sys.path, so the repository root is added to reach them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.rollout.decoding_cases import EOSER, EVERY_REMASKING, ORIGIN, budget_for_slots  # noqa: E402

REMASKING = {**EVERY_REMASKING, "eoser": EOSER, "origin": ORIGIN}
DECODERS = (("sdar", "block"), ("sdar", "none"), ("llada", "none"), ("llada", "prefix"), ("llada", "dual"),
            ("dream", "none"), ("dream", "prefix"), ("dream", "dual"))


def _requests(policy, params, rows):
    g = torch.Generator().manual_seed(0)
    return [GenerationRequest(torch.randint(10, len(policy.tokenizer), (3 + 2 * i,), generator=g), params, seed=i)
            for i in range(rows)]


def _engine(policy, cache: str, requests, slots: int | None) -> TorchEngine:
    """An engine; with `slots`, under a memory budget holding that many rows of KV cache for `requests`."""
    engine = TorchEngine(policy, kv_cache=cache)
    if slots is not None:
        engine.memory_budget = budget_for_slots(engine, requests, slots)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--speed", action="store_true", help="also measure tokens/s")
    parser.add_argument("--slots", type=int, default=None, help="memory budget of this many cache rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp()
    policies = {kind: load_policy(make_tiny_policy(kind, f"{root}/{kind}", seed=1), device=args.device,
                                  **({"block_size": 8} if kind in ("llada", "dream") else {}))
                for kind in ("sdar", "llada", "dream")}
    for kind, cache in DECODERS:
        cells = []
        for name, extra in REMASKING.items():
            if name == "origin" and kind != "dream":
                continue
            params = SamplingParams(temperature=1.0, max_tokens=32, **extra)
            requests = _requests(policies[kind], params, 8)
            engine = _engine(policies[kind], cache, requests, args.slots)
            with count_host_syncs() as counts:
                engine.generate(requests)
            cells.append(f"{name}={counts.syncs_per_step:.2f}/{counts.h2d_per_step:.2f}")
        print(f"{kind}/{cache} host syncs / host->device copies per step: {' '.join(cells)}", flush=True)
    if not args.speed:
        return
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    for kind, cache in (("sdar", "block"), ("sdar", "none"), ("llada", "none"), ("llada", "dual"),
                        ("dream", "prefix")):
        for name in ("dynamic", "random"):
            params = SamplingParams(temperature=1.0, max_tokens=64, **REMASKING[name])
            requests = _requests(policies[kind], params, 16)
            engine, best = _engine(policies[kind], cache, requests, args.slots), float("inf")
            for _ in range(5):
                start = clock()
                out = engine.generate(requests)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                best = min(best, clock() - start)
            tokens = sum(t.response_length for t in out)
            print(f"{kind}/{cache}/{name}: {tokens / best:.0f} tok/s (16 rows x 64 tokens, best of 5)", flush=True)


if __name__ == "__main__":
    main()
