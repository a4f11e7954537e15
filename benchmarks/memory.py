"""Rollout memory on CPU, measured: peak RSS while finished rows leave the KV cache (the old per-layer
index_select against in-place slot compaction), RSS around engine sleep/wake, and the cache of a real shape.

    PYTHONPATH=$PWD python benchmarks/memory.py [--gib 1.0]

RSS is read from /proc/self/status; the peak (VmHWM) is reset before each measurement through
/proc/self/clear_refs (Linux). Tensors this large are mmapped by the allocator, so freeing them returns memory.
"""
from __future__ import annotations

import argparse
import tempfile
from types import SimpleNamespace

import torch
from bench_memory import (  # sibling module: run as a script, benchmarks/ is on sys.path
    mib,
    reset_peak,
    status_bytes,
)

from rollout.decoding.kv_cache import (
    RaggedKVCache,
    compaction_moves,
    kv_bytes_per_token,
)


def eviction(gib: float) -> None:
    layers, slots, heads, dim = 8, 16, 4, 128
    capacity = int(gib * 2 ** 30 / (2 * layers * slots * heads * dim * 4))
    for name in ("index_select per layer (before)", "in-place compaction (now)"):
        cache = RaggedKVCache(layers, slots, heads, dim, capacity, torch.float32, torch.device("cpu"))
        for buf in cache.keys + cache.values:
            buf.fill_(1.0)  # touch every page
        keep = [s for s in range(slots) if s != 3]  # one row (slot 3) finished
        reset_peak()
        base = status_bytes("VmRSS")
        if name.startswith("index"):
            index = torch.tensor(keep)
            cache.keys = [k.index_select(0, index) for k in cache.keys]
            cache.values = [v.index_select(0, index) for v in cache.values]
        else:
            moves, _ = compaction_moves(keep)
            cache.move_rows(moves)
        peak = status_bytes("VmHWM") - base
        print(f"eviction, {name}: cache {mib(cache.nbytes)}, peak RSS above the cache during eviction "
              f"{mib(max(peak, 0))}")
        del cache


def sleep_wake() -> None:
    from rollout.engine import TorchEngine
    from rollout.models.tiny import make_tiny_policy
    from rollout.sampling import GenerationRequest, SamplingParams

    path = make_tiny_policy("block", tempfile.mkdtemp() + "/m", hidden_size=1024, num_layers=8, num_heads=8,
                            num_kv_heads=4, intermediate_size=4096, seed=0)
    engine = TorchEngine.from_dir(path, kv_cache="block")
    params = SamplingParams(temperature=1.0, max_tokens=16)
    requests = [GenerationRequest(torch.arange(10, 20 + i), params, seed=i) for i in range(4)]
    before = engine.generate(requests)
    rss = status_bytes("VmRSS")
    freed = engine.sleep()
    asleep = status_bytes("VmRSS")
    engine.wake()
    awake = status_bytes("VmRSS")
    after = engine.generate(requests)
    same = all(torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
               for a, b in zip(before, after, strict=True))
    print(f"sleep/wake: weights {mib(freed)}; RSS {mib(rss)} -> asleep {mib(asleep)} "
          f"(-{mib(rss - asleep)}) -> awake {mib(awake)}; decoding after wake bitwise equal: {same}")


def real_shape() -> None:
    config = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=4096,
                             num_hidden_layers=36)
    per_token = kv_bytes_per_token(config, torch.bfloat16)
    capacity = 1024 + 2000 + 4  # tracerl-trado-math: max prompt 1,024 + 2,000 tokens + one fused block
    row = per_token * capacity
    print(f"36 layers x 8 KV heads x 128, bf16: {per_token:,} bytes/token, {mib(row)} per row; batch 128: "
          f"{128 * row / 2 ** 30:.1f} GiB; a 40 GiB budget holds {int(40 * 2 ** 30 // row)} rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="KV cache size of the eviction measurement")
    args = parser.parse_args()
    real_shape()
    eviction(args.gib)
    sleep_wake()
