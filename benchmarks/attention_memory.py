"""Peak memory and time of the training-layout forward (and forward + backward), dense mask vs O(T) kernels.

    PYTHONPATH=$PWD python benchmarks/attention_memory.py [--lengths 512 1024 2048 4096 8192 16384]
        [--kernels dense chunked] [--batch 2] [--prompt 64] [--dense-limit-gib 12]

The tiny SDAR-shaped model (rollout/models/tiny.py: 2 layers, hidden 64, 4 heads / 2 KV heads), batch 2, prompts
of 64 tokens, responses of L tokens with half of them masked, scored through `score_responses` (the layout
`[prompt | clean | noisy]`, T = 64 + 2L). Each (kernel, L, measurement) runs in a fresh subprocess, after one
unmeasured warm-up call on 32-token responses, so peak RSS is clean:
- forward: no-grad scoring (old log-probs, reference model); peak RSS above the RSS before it (VmHWM reset first);
- train: scoring with gradients + backward of the summed log-probs; peak RSS above the RSS before it.
Time is the best of `--repeats` runs (1 beyond 2k tokens), on one torch thread, as the process's CPU seconds (the
table; robust to other jobs on a shared box) and wall seconds (the JSON's "s"). Dense is skipped where its mask would not fit: an
estimate of 4 x the (B, 1, T, T) fp32 mask above --dense-limit-gib (the dense forward measured ~2x the mask).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_memory import (  # sibling module: run as a script, benchmarks/ is on sys.path
    reset_peak,
    status_bytes,
)

LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


def measure(kernel: str, length: int, mode: str, batch: int, prompt: int, repeats: int, model_dir: str) -> dict:
    """One (kernel, length, mode) in this process: peak RSS growth and best time."""
    import torch

    from rollout.models.loading import load_policy

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the box is shared: one thread keeps timings comparable between kernels
    policy = load_policy(model_dir, attention_kernel=kernel)
    g = torch.Generator().manual_seed(0)
    vocab = len(policy.tokenizer)

    def batch_of(n):
        prompts = [torch.randint(10, vocab, (prompt,), generator=g) for _ in range(batch)]
        responses = [torch.randint(10, vocab, (n,), generator=g) for _ in range(batch)]
        noisy = []
        for r in responses:
            x = r.clone()
            x[torch.rand(n, generator=g) < 0.5] = policy.spec.mask_token_id
            noisy.append(x)
        return prompts, responses, noisy

    def step(data):
        policy.model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(mode == "train"):
            scores = policy.score_responses(*data)
            if mode == "train":
                scores.logprobs.sum().backward()

    step(batch_of(32))  # warm-up: first-call costs (allocator, kernels) stay out of the figures
    data = batch_of(length)
    best, best_cpu, peak = float("inf"), float("inf"), 0
    for _ in range(repeats):
        policy.model.zero_grad(set_to_none=True)
        base = status_bytes("VmRSS")
        reset_peak()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(data)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
        peak = max(peak, status_bytes("VmHWM") - base)
    return {"kernel": kernel, "length": length, "T": prompt + 2 * length, "mode": mode, "s": round(best, 3),
            "cpu_s": round(best_cpu, 3), "peak_mib": round(peak / 2 ** 20, 1)}


def dense_estimate_gib(length: int, batch: int, prompt: int) -> float:
    t = prompt + 2 * length
    return 4 * batch * t * t * 4 / 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--kernels", nargs="+", default=["dense", "chunked"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit-gib", type=float, default=12.0)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the measurements with glibc's MALLOC_MMAP_THRESHOLD_ fixed (freed blocks above it "
                             "go back to the OS at once: the peak is then the live memory, not what malloc kept)")
    parser.add_argument("--one", nargs=4, metavar=("KERNEL", "LENGTH", "MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kernel, length, mode, model_dir = args.one[0], int(args.one[1]), args.one[2], args.one[3]
        repeats = args.repeats if length <= 2048 else 1
        print(json.dumps(measure(kernel, length, mode, args.batch, args.prompt, repeats, model_dir)))
        return

    from rollout.models.tiny import make_tiny_policy

    model_dir = make_tiny_policy("sdar", tempfile.mkdtemp() + "/tiny", seed=0,
                                 max_positions=args.prompt + 2 * max(args.lengths) + 64)
    rows = []
    malloc = "default" if args.malloc_mmap_threshold is None else f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
    print(f"# batch {args.batch}, prompt {args.prompt}, tiny sdar model, 1 torch thread, {os.cpu_count()} cores, "
          f"glibc malloc {malloc}")
    print("| response L | T | kernel | forward peak (MiB) | forward (CPU s) | fwd+bwd peak (MiB) | fwd+bwd (CPU s) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        for kernel in args.kernels:
            t = args.prompt + 2 * length
            if kernel == "dense" and dense_estimate_gib(length, args.batch, args.prompt) > args.dense_limit_gib:
                print(f"| {length} | {t} | dense | skipped (~{dense_estimate_gib(length, args.batch, args.prompt):.0f}"
                      f" GiB estimated) | | | |", flush=True)
                continue
            cells = []
            for mode in ("forward", "train"):
                cmd = [sys.executable, __file__, "--one", kernel, str(length), mode, model_dir, "--batch",
                       str(args.batch), "--prompt", str(args.prompt), "--repeats", str(args.repeats)]
                env = dict(os.environ)
                if args.malloc_mmap_threshold is not None:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    cells += [f"failed (rc {done.returncode}): {tail[:80]}", ""]
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(r)
                cells += [f"{r['peak_mib']:,.0f}", f"{r['cpu_s']:.3f}"]
            print(f"| {length} | {t} | {kernel} | " + " | ".join(cells) + " |", flush=True)
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
