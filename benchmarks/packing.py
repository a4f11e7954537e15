"""Learner throughput on a batch of mixed response lengths: padded micro-batches vs packed ones (issue 13).

    PYTHONPATH=$PWD python benchmarks/packing.py [--samples 16] [--repeats 3] [--quick]

One learner update (old pass + training pass + optimizer step) on the same batch, alternating padded
(`micro_batch_size` samples per micro-batch, one per row, padded to the longest) and packed (`pack_tokens` =
the padded micro-batch's worst-case footprint, samples sharing rows), each from the same initial weights; the
median and the minimum of `--repeats` runs of each (the minimum is the figure least disturbed by other jobs
on a shared machine; CPU time of the process is reported too). tokens/s = the batch's real layout tokens (prompt + clean response + noisy
canvas per sample) per second of update wall time; "row positions" counts what the forwards actually computed
(padding included). Two estimators: TraceRL's trajectory estimator and diffu-GRPO's one_step (with its reference
pass). The model is the tiny block model (rollout.models.tiny) with longer positions.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.models.layout import layout_length
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.trajectory import Trajectory


def mixed_batch(n: int, block: int, lo: int, hi: int, seed: int = 0) -> list[ScoredSample]:
    """n rollouts, response lengths uniform in [lo, hi] (whole blocks), 2 decoding steps per block."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lo // block, hi // block + 1, (1,), generator=g)) * block
        resp = torch.randint(10, 90, (length,), generator=g)
        steps = torch.cat([torch.randperm(block, generator=g) % 2 + 2 * b for b in range(length // block)])
        prompt = torch.randint(10, 90, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g)
        traj = Trajectory(prompt_ids=prompt, response_ids=resp, step_map=steps, logprobs=torch.zeros(length),
                          confidence=torch.zeros(length), valid_length=length, nfe=2 * length // block,
                          finish_reason="eos", block_size=block, request_id=f"s{i}")
        out.append(ScoredSample(traj, advantage=1.0 if i % 2 else -1.0, reward=float(i % 2)))
    return out


def run_once(path: Path, samples, cfg: LearnerConfig) -> tuple[float, int, dict]:
    policy = load_policy(path)
    computed = []
    forward = policy.forward

    def counting(input_ids, *args, **kw):
        computed.append(int(input_ids.numel()))
        return forward(input_ids, *args, **kw)

    policy.forward = counting
    learner = Learner(policy, cfg)
    start, cpu = time.perf_counter(), time.process_time()
    metrics = learner.update(samples)
    metrics["cpu_s"] = time.process_time() - cpu
    return time.perf_counter() - start, sum(computed), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 samples, responses 8..64, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats, args.min_len, args.max_len = 6, 1, 8, 64
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_policy("block", Path(tmp) / "block", seed=1, max_positions=4096)
        spec = load_policy(path).spec
        samples = mixed_batch(args.samples, spec.block_size, args.min_len, args.max_len)
        sizes = [layout_length(spec, s.trajectory.prompt_ids.numel(), s.trajectory.response_length)
                 for s in samples]
        budget = args.micro_batch_size * (64 + 2 * args.max_len)  # the padded micro-batch's worst case
        lengths = [s.trajectory.response_length for s in samples]
        print(f"batch: {len(samples)} samples, responses {min(lengths)}..{max(lengths)} (mean "
              f"{sum(lengths) / len(lengths):.0f}), {sum(sizes)} layout tokens; padded micro_batch_size "
              f"{args.micro_batch_size}, packed pack_tokens {budget}; threads {torch.get_num_threads()}")
        warm = LearnerConfig(mu=1, micro_batch_size=2, optim=OptimConfig(lr=1e-5))
        run_once(path, mixed_batch(2, spec.block_size, 8, 16, seed=1), warm)  # first-call costs out of the figures
        for algorithm, estimator in (("tracerl", "trajectory"), ("diffu_grpo", "one_step")):
            results = {"padded": [], "packed": []}
            cpu = {"padded": [], "packed": []}
            computed = {}
            for _ in range(args.repeats):
                for name, pack in (("padded", None), ("packed", budget)):
                    cfg = LearnerConfig(algorithm=algorithm, estimator=estimator, mu=1, shuffle=False,
                                        micro_batch_size=args.micro_batch_size, pack_tokens=pack,
                                        optim=OptimConfig(lr=1e-5))
                    secs, rows, metrics = run_once(path, samples, cfg)
                    results[name].append(secs)
                    cpu[name].append(metrics["cpu_s"])
                    computed[name] = (rows, int(metrics["forwards"]))
            med = {name: statistics.median(times) for name, times in results.items()}
            best = {name: min(times) for name, times in results.items()}
            cpu_med = {name: statistics.median(times) for name, times in cpu.items()}
            for name in ("padded", "packed"):
                rows, fwd = computed[name]
                print(f"{algorithm}/{estimator} {name}: update median {med[name]:.2f} s, min {best[name]:.2f} s "
                      f"(runs {', '.join(f'{t:.2f}' for t in results[name])}; CPU median {cpu_med[name]:.2f} s), "
                      f"{sum(sizes) / med[name]:,.0f} tokens/s (median), {fwd} forwards, "
                      f"{rows:,} row positions computed")
            print(f"{algorithm}/{estimator} packed / padded tokens/s: median {med['padded'] / med['packed']:.2f}x, "
                  f"min {best['padded'] / best['packed']:.2f}x, CPU {cpu_med['padded'] / cpu_med['packed']:.2f}x")


if __name__ == "__main__":
    main()
