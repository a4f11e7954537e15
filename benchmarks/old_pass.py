"""Learner update cost with and without the separate old-log-prob pass (`learner.fuse_on_policy_old_logp`).

    PYTHONPATH=$PWD python benchmarks/old_pass.py [--samples 32] [--repeats 3] [--quick]

One learner update on the same batch of mixed-length rollouts from the same initial weights, alternating the two
settings: `fuse_on_policy_old_logp: false` (every sample's pi_old from a no-grad pass before training, as the papers'
repositories do) and `true` (samples trained before the first optimizer step take pi_old from their training
forward). Both give the same update bit for bit (tests/rl/test_learner_on_policy.py); what differs is the forward
count and the time. Settings: TraceRL's trajectory estimator with one minibatch (on-policy: every sample fused),
two and four minibatches (the first fused), and mu 2 (deterministic masks: the second inner iteration reuses the
first's pi_old); EBPO's block ELBO (random masks, one minibatch). Figures: process CPU seconds (best of
`--repeats`, one torch thread: the machine is shared), wall beside them, and scoring forwards per update.
Model: the tiny block model (rollout.models.tiny, hidden `--hidden`, 2 layers).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import mixed_batch, run_once  # benchmarks/ is not a package

from rl.learner import LearnerConfig
from rl.optim import OptimConfig
from rollout.models.tiny import make_tiny_policy

SETTINGS = {  # name -> LearnerConfig fields (micro-batches of 4 samples)
    "trajectory, 1 minibatch": {"algorithm": "tracerl", "estimator": "trajectory"},
    "trajectory, 2 minibatches": {"algorithm": "tracerl", "estimator": "trajectory", "grad_accum": "half"},
    "trajectory, 4 minibatches": {"algorithm": "tracerl", "estimator": "trajectory", "grad_accum": "quarter"},
    "trajectory, mu 2": {"algorithm": "tracerl", "estimator": "trajectory", "mu": 2},
    "block_elbo (EBPO), 1 minibatch": {"algorithm": "ebpo", "estimator": "block_elbo"},
}


def config(fields: dict, samples: int, micro: int) -> LearnerConfig:
    fields = dict(fields)
    accum = fields.pop("grad_accum", None)
    if accum is not None:  # micro-batches per optimizer step
        fields["grad_accum"] = max(1, samples // micro // {"half": 2, "quarter": 4}[accum])
    return LearnerConfig(micro_batch_size=micro, optim=OptimConfig(lr=1e-4), **{"mu": 1, **fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 samples, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats = 16, 1
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_policy("block", Path(tmp) / "block", seed=1, max_positions=4096,
                                hidden_size=args.hidden)
        batch = mixed_batch(args.samples, 4, args.min_len, args.max_len)
        print(f"{args.samples} samples, responses {args.min_len}..{args.max_len} tokens, micro-batches of "
              f"{args.micro_batch_size}, hidden {args.hidden}; CPU s best of {args.repeats}")
        print("| setting | separate old pass: CPU s (wall) | forwards | fused: CPU s (wall) | forwards | "
              "CPU ratio |")
        print("|---|---|---|---|---|---|")
        for name, fields in SETTINGS.items():
            base = config(fields, args.samples, args.micro_batch_size)
            best = {}
            for _ in range(args.repeats):
                for fuse in (False, True):
                    cfg = dataclasses.replace(base, fuse_on_policy_old_logp=fuse)
                    got = run_once(path, batch, cfg)
                    if fuse not in best or got["cpu"] < best[fuse]["cpu"]:
                        best[fuse] = got
            sep, fus = best[False], best[True]
            print(f"| {name} | {sep['cpu']:.2f} ({sep['wall']:.2f}) | {sep['forwards']:.0f} | {fus['cpu']:.2f} "
                  f"({fus['wall']:.2f}) | {fus['forwards']:.0f} | {sep['cpu'] / fus['cpu']:.2f}x |")


if __name__ == "__main__":
    main()
