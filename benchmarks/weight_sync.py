"""Weight sync throughput on the driver's path: learner actor -> rollout worker actor, bucketed vs one call per
parameter.

    python benchmarks/weight_sync.py [--repeats 5] [--hidden 512] [--layers 8] [--only transports]

A Qwen3-shaped policy (hidden 512, 8 layers, 8 heads, ffn 1536: ~27M parameters with the small tokenizer's
vocabulary, ~110 MB in fp32) sits in a LearnerGroup (torch backend, one LearnerWorker actor). The receiver is a
real rollout.worker.RolloutWorker actor (TorchEngine, built from the same checkpoint), and chunks go through
rl.weight_sync.push_weights, exactly as the driver's RolloutPool.sync sends them. Measured end to end from the
driver (chunking + CPU copies + object store + apply + the final completeness check), on a local Ray on 127.0.0.1:
- bucketed: `LearnerGroup.weight_chunks(bucket)` streamed with `push_weights` (at most 2 chunks in flight; 64 MiB is
  the driver's own bucket, launch.driver_roles.SYNC_BUCKET_BYTES);
- per-parameter, blocking: one chunk per tensor, each applied before the next is sent (max_inflight 1);
- per-parameter, pipelined: one chunk per tensor, 2 in flight (isolates per-call overhead from blocking);
- in-process: chunk + apply with no Ray (the copy cost floor).
Prints a markdown table (BENCHMARKS.md, "## Weight sync").

Transports (the driver's two paths, same model, same run): `RolloutPool.sync` from the learner actor to two
RolloutWorker actors through the object store (push_weights) and through the gloo group (rl/collective_sync.py),
64 MiB buckets (the driver's) and 8 MiB; seconds and MB/s end to end, and the sender's (learner actor's) peak RSS
during the sync above its RSS before it (sampled every 2 ms in the actor). A second table, "transports".
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial



def lora_policy(path: str, r: int, device="cpu"):
    from rollout.models.loading import load_policy
    from rollout.models.lora import apply_lora

    return apply_lora(load_policy(path, device=device), r=r, alpha=2 * r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--only", choices=["all", "transports"], default="all")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from launch.driver_roles import SYNC_BUCKET_BYTES
    from rl.learner import LearnerConfig
    from rl.learner_worker import LearnerGroup
    from rl.weight_sync import chunk_weights, lora_weights, merged_weights, nbytes, push_weights
    from rollout.models.loading import load_policy
    from rollout.models.tiny import make_tiny_policy
    from rollout.weight_receiver import WeightReceiver
    from rollout.worker import RolloutWorker

    tmp = tempfile.mkdtemp(prefix="wsync_")
    path = make_tiny_policy("block", os.path.join(tmp, "model"), seed=0, hidden_size=args.hidden,
                            num_layers=args.layers, num_heads=8, num_kv_heads=8, intermediate_size=3 * args.hidden)
    local = load_policy(path)
    n_params = sum(p.numel() for p in local.model.parameters())
    n_tensors = sum(1 for _ in local.model.parameters())
    total = sum(p.numel() * p.element_size() for p in local.model.parameters())

    rows = []
    if args.only == "transports":
        return transports(path, total, args.repeats)

    def record(label: str, seconds: list[float], chunks: int) -> None:
        best, med = min(seconds), statistics.median(seconds)
        rows.append((label, chunks, med, total / med / 1e6, total / best / 1e6))

    # In-process floor: chunk (CPU copies) + apply, no Ray.
    torch.set_num_threads(1)
    dst = load_policy(path)
    for bucket in (32 << 20,):
        times = []
        for _ in range(args.repeats):
            rec = WeightReceiver(dst.causal_lm)
            t0 = time.perf_counter()
            n = 0
            for entries in chunk_weights(merged_weights(local.causal_lm), bucket):
                rec.apply(entries, 1)
                n += 1
            rec.finish(1)
            times.append(time.perf_counter() - t0)
        record(f"in-process, {bucket >> 20} MiB buckets", times, n)
    del dst

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    version = 0

    def push(group, receiver, bucket: int, split: bool, inflight: int) -> tuple[float, int]:
        nonlocal version
        version += 1
        t0 = time.perf_counter()
        chunks = push_weights(group.weight_chunks(bucket, version=version, split_large=split), [receiver], version,
                              max_inflight=inflight)
        return time.perf_counter() - t0, chunks

    try:
        group = LearnerGroup(partial(load_policy, path), LearnerConfig(), num_workers=1)
        receiver = ray.remote(RolloutWorker).options(num_cpus=1).remote(str(path))
        ray.get(receiver.ready.remote())
        cases = [(f"Ray, {SYNC_BUCKET_BYTES >> 20} MiB buckets (the driver's), 2 in flight", SYNC_BUCKET_BYTES, True, 2),
                 ("Ray, 32 MiB buckets, 2 in flight", 32 << 20, True, 2),
                 ("Ray, 8 MiB buckets, 2 in flight", 8 << 20, True, 2),
                 ("Ray, 8 MiB buckets, blocking", 8 << 20, True, 1),
                 ("Ray, one call per parameter, blocking", 1, False, 1),
                 ("Ray, one call per parameter, 2 in flight", 1, False, 2)]
        for label, bucket, split, inflight in cases:
            runs = [push(group, receiver, bucket, split, inflight) for _ in range(args.repeats + 1)]
            record(label, [t for t, _ in runs[1:]], runs[-1][1])  # the first run warms the actors up
        group.shutdown()
        # LoRA (r 16, all projections): many small adapter tensors, the case where per-call overhead dominates. The
        # worker merges the deltas onto its copy of the base (the driver's lora_delta sync).
        lora_bytes = sum(nbytes(t) for _, t in lora_weights(lora_policy(str(path), 16).causal_lm))
        group = LearnerGroup(partial(lora_policy, str(path), 16), LearnerConfig(), num_workers=1)
        for label, bucket, inflight in (("Ray, LoRA r16 deltas, 8 MiB buckets, 2 in flight", 8 << 20, 2),
                                        ("Ray, LoRA r16 deltas, one call per tensor, blocking", 1, 1)):
            runs = [push(group, receiver, bucket, False, inflight) for _ in range(args.repeats + 1)]
            times = [t for t, _ in runs[1:]]
            rows.append((label, runs[-1][1], statistics.median(times), lora_bytes / statistics.median(times) / 1e6,
                         lora_bytes / min(times) / 1e6))
        group.shutdown()
    finally:
        ray.shutdown()

    print(f"model: {n_params / 1e6:.1f}M parameters in {n_tensors} tensors, {total / 2**20:.0f} MiB fp32 "
          f"(LoRA r16 deltas: {lora_bytes / 2**20:.1f} MiB); "
          f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, repeats {args.repeats}\n")
    print("| path | chunks | median s | MB/s (median) | MB/s (best) |")
    print("|---|---|---|---|---|")
    for label, chunks, med, rate_med, rate_best in rows:
        print(f"| {label} | {chunks} | {med:.3f} | {rate_med:.0f} | {rate_best:.0f} |")
    transports(path, total, args.repeats)


def _start_rss_sampler(_actor) -> int:
    """Runs inside an actor (__ray_call__): RSS now, and a thread recording the peak from here on."""
    import threading

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "run": True}

    def sample():
        while state["run"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.002)

    _actor._rss_state = state  # on the actor: each pickled function gets globals of its own
    threading.Thread(target=sample, daemon=True).start()
    return state["peak"]


def _stop_rss_sampler(_actor) -> int:
    state = _actor._rss_state
    state["run"] = False
    return state["peak"]


def transports(path: str, total: int, repeats: int) -> None:
    """Object store vs collective group, learner actor -> two RolloutWorker actors, as RolloutPool.sync sends."""
    import ray
    import torch

    from launch.driver_roles import RolloutPool, sync_options
    from rl.learner import LearnerConfig
    from rl.learner_worker import LearnerGroup
    from rollout.models.loading import load_policy
    from rollout.worker import RolloutWorker

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    import launch.driver_roles as roles

    rows = []
    try:
        group = LearnerGroup(partial(load_policy, path), LearnerConfig(), num_workers=1, num_cpus_per_worker=0.5)
        workers = [ray.remote(RolloutWorker).options(num_cpus=0.5).remote(str(path)) for _ in range(2)]
        ray.get([w.ready.remote() for w in workers])
        sender = group.workers[0]
        version = 0
        for transport in ("object_store", "collective"):
            for bucket in (64 << 20, 8 << 20):
                roles.SYNC_BUCKET_BYTES = bucket  # the module constant RolloutPool._send reads
                pool = RolloutPool.of_workers(workers, transport=transport,
                                              sync_options=sync_options(lora=False, engine="torch"))
                times, peaks = [], []
                for run in range(repeats + 1):  # the first run warms up (and forms the group)
                    version += 1
                    base = ray.get(sender.__ray_call__.remote(_start_rss_sampler))
                    seconds = pool.sync(group, version)
                    peak = ray.get(sender.__ray_call__.remote(_stop_rss_sampler))
                    if run:
                        times.append(seconds)
                        peaks.append(peak - base)
                med = statistics.median(times)
                rows.append((transport, bucket >> 20, med, total / med / 1e6, total / min(times) / 1e6,
                             max(peaks) / 2**20))
        group.shutdown()
    finally:
        ray.shutdown()
    print(f"\ntransports: learner actor -> 2 RolloutWorker actors, {total / 2**20:.0f} MiB fp32, repeats {repeats}, "
          f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs\n")
    print("| transport | bucket MiB | median s | MB/s (median) | MB/s (best) | sender peak RSS over start (MiB) |")
    print("|---|---|---|---|---|---|")
    for transport, bucket, med, rate, best, rss in rows:
        print(f"| {transport} | {bucket} | {med:.3f} | {rate:.0f} | {best:.0f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
