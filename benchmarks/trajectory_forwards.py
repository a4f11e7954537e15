"""The learner's trajectory-estimator step on a block model: one forward per step group (per-pass) vs one forward over
`[prompt | clean | noisy copy 1 | ... | noisy copy G]` (shared clean part, rl/estimators/trajectory.py).

    PYTHONPATH=$PWD python benchmarks/trajectory_forwards.py [--batch 28] [--prompt 20] [--response 16]
        [--steps-per-block 4] [--repeats 5] [--kernel chunked] [--packed]

A tiny random-init `block` model (rollout/models/tiny.py: hidden 128, 2 layers, 4 heads / 4 KV heads, MLP 256,
block 4), `--batch` samples of `--prompt` prompt and `--response` response tokens, each block decoded in exactly
`--steps-per-block` steps (static step maps, shrink 1: G = steps per block groups). Measured: the estimate with
gradients and the backward of sum(seq_logp), what the learner runs per micro-batch. Each mode runs in a fresh
subprocess (peak RSS not inherited from the other): one unmeasured warm-up, then `--repeats` measured runs; the table
gives the median CPU seconds of the process (one torch thread: robust to other jobs on a shared box), the median wall
seconds, and the peak RSS above the RSS before the run (VmHWM reset first), the largest over the repeats. Both modes
are checked to give the same sum(seq_logp).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_memory import reset_peak, status_bytes  # sibling module: run as a script, benchmarks/ is on sys.path


def inputs(policy, batch: int, prompt: int, response: int, steps_per_block: int):
    """EstimatorInput with static step maps: every block decoded in `steps_per_block` steps."""
    import torch

    from rl.estimators.base import EstimatorInput

    g = torch.Generator().manual_seed(0)
    bs, vocab = policy.spec.block_size, len(policy.tokenizer)
    prompts = [torch.randint(10, vocab, (prompt,), generator=g) for _ in range(batch)]
    responses = [torch.randint(10, vocab, (response,), generator=g) for _ in range(batch)]
    maps = []
    for _ in range(batch):
        blocks = []
        for blk in range(-(-response // bs)):
            local = torch.cat([torch.arange(steps_per_block),
                               torch.randint(0, steps_per_block, (bs - steps_per_block,), generator=g)])
            blocks.append(blk * steps_per_block + local[torch.randperm(bs, generator=g)])
        maps.append(torch.cat(blocks)[:response])
    return EstimatorInput(prompts, responses, [f"s{i}" for i in range(batch)], step_maps=maps, block_size=bs)


def measure(mode: str, args, model_dir: str) -> dict:
    import torch

    from rl.estimators.trajectory import trajectory_estimator
    from rollout.models.layout import RowPacking, layout_length
    from rollout.models.loading import load_policy

    torch.manual_seed(0)
    torch.set_num_threads(1)
    policy = load_policy(model_dir, attention_kernel=args.kernel)
    inp = inputs(policy, args.batch, args.prompt, args.response, args.steps_per_block)
    packing = RowPacking(None) if args.packed else None
    shared = mode == "shared-clean"

    def step():
        policy.model.zero_grad(set_to_none=True)
        est = trajectory_estimator(policy, inp, shared_clean=shared, packing=packing)
        est.seq_logp.sum().backward()
        return est

    step()  # warm-up
    cpu, wall, peak = [], [], 0
    for _ in range(args.repeats):
        base = status_bytes("VmRSS")
        reset_peak()
        start, start_cpu = time.perf_counter(), time.process_time()
        est = step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        peak = max(peak, status_bytes("VmHWM") - base)
    groups = args.steps_per_block
    per_pass = layout_length(policy.spec, args.prompt, args.response)
    tokens = (layout_length(policy.spec, args.prompt, args.response, copies=groups) if shared
              else groups * per_pass)
    return {"mode": mode, "forwards": est.forwards, "tokens_per_sample": tokens,
            "cpu_s": round(statistics.median(cpu), 4), "s": round(statistics.median(wall), 4),
            "peak_mib": round(peak / 2 ** 20, 1), "seq_logp_sum": float(est.seq_logp.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--prompt", type=int, default=20)
    parser.add_argument("--response", type=int, default=16)
    parser.add_argument("--steps-per-block", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernel", default="chunked")
    parser.add_argument("--packed", action="store_true", help="packed rows (documents) instead of one per row")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args, args.one[1])))
        return

    from rollout.models.tiny import make_tiny_policy

    model_dir = make_tiny_policy("block", tempfile.mkdtemp() + "/tiny", seed=0, hidden_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=4, intermediate_size=256, block_size=4)
    print(f"# tiny block model (hidden 128, 2 layers, 4 heads, block 4), batch {args.batch}, prompt {args.prompt}, "
          f"response {args.response}, {args.steps_per_block} steps per block, kernel {args.kernel}, "
          f"{'packed' if args.packed else 'padded'} rows, 1 torch thread, median of {args.repeats}, "
          f"{os.cpu_count()} cores")
    print("| path | forwards | layout tokens / sample | fwd+bwd (CPU s) | fwd+bwd (wall s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for mode in ("per-pass", "shared-clean"):
        cmd = [sys.executable, __file__, "--one", mode, str(model_dir), *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"| {mode} | failed (rc {done.returncode}): {tail[:100]} | | | | |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"| {mode} | {r['forwards']} | {r['tokens_per_sample']} | {r['cpu_s']:.3f} | {r['s']:.3f} | "
              f"{r['peak_mib']:,.1f} |", flush=True)
    if len(rows) == 2:
        a, b = rows
        print(f"\nCPU time shared / per-pass: {b['cpu_s'] / a['cpu_s']:.2f}; peak RSS: "
              f"{b['peak_mib'] / max(a['peak_mib'], 1e-9):.2f}; |sum seq_logp difference|: "
              f"{abs(a['seq_logp_sum'] - b['seq_logp_sum']):.2e}")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
