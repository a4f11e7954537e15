"""Learner throughput on a batch of mixed response lengths: padded micro-batches vs packed ones (issue 13).

    PYTHONPATH=$PWD python benchmarks/packing.py [--samples 16] [--repeats 3] [--threads 1] [--quick]

One learner update (old pass + training pass + optimizer step) on the same batch, from the same initial weights,
alternating padded (`micro_batch_size` samples per micro-batch, one per row, padded to the longest) and packed
(`pack_tokens` = the padded micro-batch's worst-case footprint, samples sharing rows) runs, for micro_batch_size
4 and 16 and two estimators (TraceRL's trajectory estimator; diffu-GRPO's one_step, with its reference pass).
The machine is shared, so the figure is the process's CPU time (best of `--repeats`, torch on `--threads`
threads); wall time is printed too. The last lines compare each packed variant's best setting with the best padded
setting (the honest comparison: padded micro-batches of 1 have no padding at all). tokens/s = the batch's real layout tokens (prompt + clean response + noisy
canvas per sample) per CPU second. "positions" = the (row x width) positions every forward computed, padding
included; "attention" = sum over forwards of rows x width^2, what a dense attention mask costs; "chunked area" = sum
over forwards of the chunked kernel's query x key pairs (rollout/models/attention_chunked.py), what it computes.
The model is the tiny block model (rollout.models.tiny; hidden 64 or `--hidden`, 2 layers) with 4096 positions.

On a GPU (`--device cuda`): seconds are wall seconds between CUDA synchronisations (best of `--repeats`), the model
is `--hidden` wide with `--layers` layers (`--sdar-1.7b`: SDAR-1.7B's geometry, small vocabulary), weights in
`--dtype`, and the attention kernel is the one the learner's `auto` resolves to there (FlexAttention for long
training forwards); a first unmeasured pass per setting compiles FlexAttention's shape buckets.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.models import attention_chunked
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


def run_once(path: Path, samples, cfg: LearnerConfig, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """One update on a fresh policy: CPU and wall seconds, positions and dense-attention cost of its forwards
    (on CUDA "cpu" holds the synchronised wall seconds: the figure compared)."""
    policy = load_policy(path, device=device, dtype=dtype)
    shapes = []
    forward = policy.forward

    def counting(input_ids, *args, **kw):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kw)

    policy.forward = counting
    areas = []
    plan = attention_chunked.document_plan

    def measured_plan(mask, rows):  # the chunked kernel's area: sum over chunks of rows x queries x key columns
        chunks = plan(mask, rows)
        areas.append(sum((mask.shape[0] if c.row is None else 1) * (c.q_hi - c.q_lo) * c.width for c in chunks))
        return chunks

    learner = Learner(policy, cfg)
    attention_chunked.document_plan = measured_plan
    cuda = torch.device(device).type == "cuda"
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = learner.update(samples)
        if cuda:
            torch.cuda.synchronize()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        attention_chunked.document_plan = plan
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del learner, policy
    if cuda:
        cpu = wall
        torch.cuda.empty_cache()
    return {"cpu": cpu, "wall": wall, "forwards": metrics["forwards"], "positions": sum(r * w for r, w in shapes),
            "attention": sum(r * w * w for r, w in shapes), "area": sum(areas), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--one-row", action="store_true",
                        help="also packed with one row per micro-batch (learner.pack_row_tokens = pack_tokens)")
    parser.add_argument("--estimators", nargs="+", default=["trajectory", "one_step"])
    parser.add_argument("--hidden", type=int, default=64,
                        help="model width (intermediate 2x): wider models spend more on linear layers, less on attention")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (KV heads: half)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden)")
    parser.add_argument("--sdar-1.7b", dest="sdar", action="store_true",
                        help="SDAR-1.7B's geometry: hidden 2048, 28 layers, 16 heads, 8 KV heads, MLP 6144")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--checkpointing", action="store_true", help="learner.gradient_checkpointing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 samples, responses 8..64, 1 repeat")
    args = parser.parse_args()
    if args.sdar:
        args.hidden, args.layers, args.heads, args.intermediate = 2048, 28, 16, 6144
    dtype = getattr(torch, args.dtype)
    unit = "GPU-s" if args.device == "cuda" else "CPU-s"
    if args.quick:
        args.samples, args.repeats, args.min_len, args.max_len = 6, 1, 8, 64
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_policy("block", Path(tmp) / "block", seed=1, max_positions=4096, hidden_size=args.hidden,
                                intermediate_size=args.intermediate or 2 * args.hidden, num_layers=args.layers,
                                num_heads=args.heads, num_kv_heads=max(1, args.heads // 2))
        spec = load_policy(path).spec
        samples = mixed_batch(args.samples, spec.block_size, args.min_len, args.max_len)
        sizes = [layout_length(spec, s.trajectory.prompt_ids.numel(), s.trajectory.response_length)
                 for s in samples]
        lengths = [s.trajectory.response_length for s in samples]
        print(f"batch: {len(samples)} samples, responses {min(lengths)}..{max(lengths)} (mean "
              f"{sum(lengths) / len(lengths):.0f}), {sum(sizes)} layout tokens; torch threads {args.threads}; "
              f"hidden {args.hidden}")
        run_once(path, mixed_batch(2, spec.block_size, 8, 16, seed=1), LearnerConfig(mu=1, micro_batch_size=2))
        algorithms = {"trajectory": "tracerl", "one_step": "diffu_grpo"}
        for algorithm, estimator in ((algorithms[e], e) for e in args.estimators):
            best: dict[str, tuple[float, str]] = {}  # variant -> (lowest CPU s, its setting)
            for mbs in args.micro_batch_sizes:
                budget = mbs * (64 + 2 * args.max_len)  # the padded micro-batch's worst-case footprint
                variants = [("padded", None, None), ("packed", budget, None)]
                if args.one_row:
                    variants.append(("packed-one-row", budget, budget))
                runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
                for _ in range(args.repeats):
                    for name, pack, row in variants:
                        cfg = LearnerConfig(algorithm=algorithm, estimator=estimator, mu=1, shuffle=False,
                                            micro_batch_size=mbs, pack_tokens=pack, pack_row_tokens=row,
                                            optim=OptimConfig(lr=1e-5), gradient_checkpointing=args.checkpointing)
                        if args.device == "cuda" and not runs[name]:  # compile this setting's shape buckets
                            run_once(path, samples, cfg, args.device, dtype)
                        runs[name].append(run_once(path, samples, cfg, args.device, dtype))
                cpu = {name: min(r["cpu"] for r in rs) for name, rs in runs.items()}
                for name, rs in runs.items():
                    times = ", ".join(f"{r['cpu']:.2f}" for r in rs)
                    wall = min(r["wall"] for r in rs)
                    label = f"micro_batch_size {mbs}" if name == "padded" else f"pack_tokens {budget}"
                    peak = f", peak {rs[0]['peak'] / 2**30:.2f} GiB" if args.device == "cuda" else ""
                    print(f"{algorithm}/{estimator} {name} ({label}): {unit[:3]} {cpu[name]:.2f} s (runs {times}; wall "
                          f"{wall:.2f} s{peak}), {sum(sizes) / cpu[name]:,.0f} tokens/{unit}, {int(rs[0]['forwards'])} forwards, "
                          f"positions {rs[0]['positions']:,}, attention {rs[0]['attention'] / 1e6:,.0f}M, chunked area "
                          f"{rs[0]['area'] / 1e6:,.1f}M", flush=True)
                    if name not in best or cpu[name] < best[name][0]:
                        best[name] = (cpu[name], label)
                for name in runs:
                    if name != "padded":
                        print(f"{algorithm}/{estimator} micro_batch_size {mbs}: {name} / padded tokens/s "
                              f"{cpu['padded'] / cpu[name]:.2f}x")
            padded_cpu, padded_label = best["padded"]
            for name, (value, label) in best.items():
                if name != "padded":
                    print(f"{algorithm}/{estimator} best {name} ({label}) / best padded ({padded_label}) tokens/s "
                          f"{padded_cpu / value:.2f}x")

if __name__ == "__main__":
    main()
