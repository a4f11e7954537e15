"""Rollout benchmarks (random-init Qwen3, hidden 512, 8 layers, 8 heads x 64, ffn 1536, vocab 8192).

P1: cached vs uncached block decoding, tokens/s, gen 256, block 4, batch 16 (goal >= 8x). A full uncached run
    would take ~20 minutes, so its time is measured on sampled blocks spread over the generation (the real
    uncached decoder, started from the cached run's state at that block) and integrated over all blocks.
P3: block diffusion vs the same model decoding autoregressively with HF `generate` and its KV cache, tokens/s at
    batch 1 and 16 (goal >= 1.5x), with tokens per forward: the dynamic threshold 0.9 (which a random model, being
    near-uniform, never passes: one token a step) and fixed k = 2 / 4 tokens per step.
P3T: P3 on trained toy models (a random model's confidence never passes a threshold): a block-diffusion model
    SFT'd on Countdown (block 4) decoding with the dynamic threshold, against a causal LM of the same size and
    initialisation trained next-token on the same data for the same steps, decoding with HF `generate` + KV cache;
    both greedy over the task's 200 held-out prompts in batches of 16, side by side: time, tokens/s, tokens per
    forward and accuracy (so speed is not bought with wrong answers). `--trained DIR` keeps the two checkpoints
    (trained there when absent, ~12 minutes on the loaded 2-core box; reused after).
F1: the same weights as a full-attention model (LLaDA-style semi-AR blocks): exact no-cache decoding vs the
    Fast-dLLM prefix and dual caches, tokens/s and token agreement with the exact decoder.
P6: model FLOP utilisation of cached rollout (executed FLOPs of every forward / wall time) against this CPU's
    fp32 matmul peak measured in the same run (goal >= 30%), and a profile of where the time goes.

    python benchmarks/decoding.py --threads 1 --profile   # full run (~5 minutes; the figures in BENCHMARKS.md)
    python benchmarks/decoding.py --quick                 # under a minute (smaller shapes: a smoke run)
    python benchmarks/decoding.py --only P3T --threads 1 --trained bench/p3t   # P3 on trained toy models
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


import torch

from rollout.decoding.block import decode_blocks_cached
from rollout.decoding.reference import decode_blocks_uncached
from rollout.decoding.state import Row
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams

# Sibling modules: run as a script, this file's folder is on sys.path.
from bench_timing import QUIET, log, timed, wait_quiet
from decoding_trained import QUICK_TOY, TOY, bench_p3_trained

SIZE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536, max_positions=2048)
QUICK_SIZE = dict(SIZE, num_layers=4)
VOCAB = 8192


def build_model(out_dir: Path, size: dict, seed: int = 0) -> Path:
    """The tiny-policy checkpoint with its vocabulary projection widened to 8192 rows (random init)."""
    import transformers

    path = make_tiny_policy("block", out_dir, seed=seed, **size)
    config = transformers.AutoConfig.from_pretrained(path)
    config.vocab_size = VOCAB
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def matmul_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of an n x n matmul over a few seconds (the CPU's practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


class FlopCounter:
    """Executed FLOPs of every forward (linear layers, attention scores and values, vocabulary rows)."""

    def __init__(self, policy):
        config = policy.causal_lm.config
        self.policy = policy
        self.layers = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden, self.vocab = config.hidden_size, config.vocab_size
        layer_params = sum(p.numel() for n, p in policy.causal_lm.named_parameters()
                           if ".layers." in n and p.dim() == 2)
        self.linear_per_token = 2 * layer_params
        self.flops, self.forwards, self.query_tokens = 0, 0, 0
        self._forward, self._logits = policy.forward, policy.logits_from_hidden
        policy.forward, policy.logits_from_hidden = self.forward, self.logits_from_hidden

    def forward(self, input_ids, position_ids, attn_bias, **kwargs):
        b, q = input_ids.shape
        k = attn_bias.shape[-1]
        self.flops += b * q * self.linear_per_token + 4 * b * self.layers * self.heads * q * k * self.head_dim
        self.forwards += 1
        self.query_tokens += b * q
        return self._forward(input_ids, position_ids, attn_bias, **kwargs)

    def logits_from_hidden(self, hidden):
        self.flops += 2 * hidden[..., 0].numel() * self.hidden * self.vocab
        return self._logits(hidden)

    def close(self):
        del self.policy.forward, self.policy.logits_from_hidden


def _requests(batch: int, prompt_len: int, params: SamplingParams, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [GenerationRequest(torch.randint(10, 100, (prompt_len,), generator=g), params, seed=i)
            for i in range(batch)]


# The box is shared: other jobs' threads make every OpenMP region of ours wait (10x slowdowns of small forwards).
# Before each timed run, wait (up to `timeout` s) until others use at most `max_busy` of the CPU.
def _tokens(trajs) -> int:
    return sum(t.response_length for t in trajs)


def uncached_seconds(policy, requests, cached, sample_blocks: int, forwards_per_sample: int = 3) -> float:
    """Time of a full uncached decode, from the real uncached decoder timed at sampled blocks (see P1)."""
    bs = policy.spec.block_size
    n_blocks = requests[0].sampling.max_tokens // bs
    samples = sorted({round(i * (n_blocks - 1) / max(1, sample_blocks - 1)) for i in range(sample_blocks)})
    per_forward = {}
    for block in samples:
        log(f"P1 uncached forwards at block {block}/{n_blocks}")
        rows = [Row(i, r, policy.spec, policy.device) for i, r in enumerate(requests)]
        for row, traj in zip(rows, cached):
            end = block * bs
            row.tokens[:end] = traj.response_ids[:end]
            row.decoded[:end] = True
            row.block, row.step = block, int(traj.step_map[:end].max()) + 1 if end else 0
        stamps = [time.perf_counter()]
        with torch.inference_mode():
            decode_blocks_uncached(policy, rows, on_step=lambda _: stamps.append(time.perf_counter()),
                                   max_forwards=forwards_per_sample)
        per_forward[block] = min(b - a for a, b in zip(stamps, stamps[1:]))
    # Piecewise-linear in the block index (cost grows with the visible length), times steps per block.
    steps_per_block = sum(t.nfe for t in cached) / len(cached) / n_blocks
    known = sorted(per_forward)
    total = 0.0
    for block in range(n_blocks):
        hi = next(k for k in known if k >= block)
        lo = max(k for k in known if k <= block)
        w = 0.0 if hi == lo else (block - lo) / (hi - lo)
        total += steps_per_block * ((1 - w) * per_forward[lo] + w * per_forward[hi])
    return total


def bench_p1(policy, batch, prompt_len, gen, sample_blocks, full_uncached, repeats):
    params = SamplingParams(temperature=0, max_tokens=gen, remasking="low_confidence_static", steps_per_block=4,
                            stop_at_eos=False)
    requests = _requests(batch, prompt_len, params)
    engine = TorchEngine(policy)
    counter = FlopCounter(policy)
    log(f"P1 cached: batch {batch}, gen {gen}")
    cached, t_cached = timed(lambda: engine.generate(requests), repeats)
    flops, forwards = counter.flops / repeats, counter.forwards // repeats
    counter.close()
    if full_uncached:
        log("P1 uncached (full run)")
        _, t_uncached = timed(lambda: TorchEngine(policy, kv_cache="none").generate(requests))
        how = "full run"
    else:
        t_uncached = uncached_seconds(policy, requests, cached, sample_blocks)
        how = f"{sample_blocks} sampled blocks"
    tokens = _tokens(cached)
    return {
        "cached_tok_s": tokens / t_cached, "uncached_tok_s": tokens / t_uncached, "speedup": t_uncached / t_cached,
        "uncached_measured_on": how, "cached_seconds": t_cached, "forwards": forwards,
        "cached_gflop_s": flops / t_cached / 1e9,
    }


def _hf_generate(policy, batch, prompt_len, gen) -> float:
    """Seconds for HF `generate` (greedy, KV cache) to produce `gen` tokens for each of `batch` prompts."""
    model = policy.causal_lm
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (batch, prompt_len), generator=g)
    with torch.inference_mode():
        _, seconds = timed(lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
            use_cache=True, pad_token_id=policy.spec.pad_token_id, eos_token_id=None))
    return seconds


def bench_p3(policy, batches, prompt_len, gen, repeats):
    configs = {
        "dynamic 0.9": dict(remasking="low_confidence_dynamic", threshold=0.9),
        "static k=2": dict(remasking="low_confidence_static", steps_per_block=2),
        "static k=4": dict(remasking="low_confidence_static", steps_per_block=1),
    }
    results = {}
    for batch in batches:
        best = {name: float("inf") for name in ["AR generate", *configs]}
        per_forward = {}
        for rep in range(repeats):  # interleaved, so background load hits every configuration alike
            log(f"P3 batch {batch}, round {rep + 1}/{repeats}")
            best["AR generate"] = min(best["AR generate"], _hf_generate(policy, batch, prompt_len, gen))
            for name, extra in configs.items():
                params = SamplingParams(temperature=1.0, max_tokens=gen, stop_at_eos=False, **extra)
                requests = _requests(batch, prompt_len, params)
                trajs, seconds = timed(lambda: TorchEngine(policy).generate(requests))
                best[name] = min(best[name], seconds)
                per_forward[name] = _tokens(trajs) / sum(t.nfe for t in trajs)
        row = {"AR generate tok/s": batch * gen / best["AR generate"]}
        for name in configs:
            row[f"{name} tok/s"] = batch * gen / best[name]
            row[f"{name} tok/forward"] = per_forward[name]
            row[f"{name} vs AR"] = row[f"{name} tok/s"] / row["AR generate tok/s"]
        results[f"batch {batch}"] = row
    return results


def bench_full_caches(model_dir: Path, batch: int, prompt_len: int, gen: int, block: int, steps_per_block: int,
                      repeats: int) -> dict:
    """F1: the same weights driven as a full-attention (LLaDA-style) model: no cache vs Fast-dLLM prefix / dual.

    Greedy low-confidence decoding; agreement = fraction of response tokens equal to the exact decoder's.
    """
    import dataclasses

    policy = load_policy(model_dir)
    policy.spec = dataclasses.replace(policy.spec, kind="llada", attention="full", block_size=block)
    params = SamplingParams(temperature=0, max_tokens=gen, remasking="low_confidence_static",
                            steps_per_block=steps_per_block)
    requests = _requests(batch, prompt_len, params)
    out, results = {}, {}
    for mode in ("none", "prefix", "dual"):
        log(f"F1 full attention, kv_cache={mode}")
        out[mode], seconds = timed(lambda: TorchEngine(policy, kv_cache=mode).generate(requests), repeats)
        results[f"{mode} tok/s"] = _tokens(out[mode]) / seconds
    for mode in ("prefix", "dual"):
        same = sum(int((a.response_ids == b.response_ids).sum()) for a, b in zip(out["none"], out[mode]))
        results[f"{mode} speedup"] = results[f"{mode} tok/s"] / results["none tok/s"]
        results[f"{mode} agreement"] = same / _tokens(out["none"])
    return results


def profile_cached(policy, batch, prompt_len, gen, top: int = 12) -> str:
    params = SamplingParams(temperature=0, max_tokens=gen, remasking="low_confidence_static", steps_per_block=4,
                            stop_at_eos=False)
    requests = _requests(batch, prompt_len, params)
    rows = [Row(i, r, policy.spec, policy.device) for i, r in enumerate(requests)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        start = time.perf_counter()
        decode_blocks_cached(policy, rows)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages) / 1e6
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top)
    return f"wall {wall:.2f}s under the profiler, op self time {total_self:.2f}s\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute")
    parser.add_argument("--only", default="P1,P3,P6,F1", help="comma-separated subset of P1,P3,P6,F1,P3T")
    parser.add_argument("--trained", type=Path, help="P3T: directory of the two trained toy checkpoints (trained "
                        "there when absent; default: a temporary directory)")
    parser.add_argument("--thresholds", default="0.9,0.7,0.5", help="P3T: dynamic-threshold values")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--profile", action="store_true", help="print a profile of cached decoding (P6)")
    parser.add_argument("--repeats", type=int, help="best of this many runs per figure (default 2; quick 1)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's, the number of cores; --quick: 1, because on a busy "
                             "shared box two OpenMP threads wait on each other and small forwards slow down 10x)")
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="before each timed run, wait up to this many seconds for other jobs to go idle")
    args = parser.parse_args()
    only = set(args.only.upper().split(","))
    if args.quick:
        size, batch, prompt_len, gen, p3_batches, p3_gen, samples = QUICK_SIZE, 4, 16, 32, (4,), 32, 4
    else:
        size, batch, prompt_len, gen, p3_batches, p3_gen, samples = SIZE, 16, 64, 256, (1, 16), 256, 6
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    repeats = args.repeats or (1 if args.quick else 2)
    QUIET["timeout"] = args.quiet_wait
    figures: dict = {"threads": torch.get_num_threads(), "repeats": repeats,
                     "load_avg_1min_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", size)
        policy = load_policy(model_dir)
        figures["params_M"] = sum(p.numel() for p in policy.causal_lm.parameters()) / 1e6
        warm = SamplingParams(temperature=0, max_tokens=8, stop_at_eos=False)
        TorchEngine(policy).generate(_requests(2, 8, warm))
        if "P6" in only:
            log("P6 matmul peak")
            wait_quiet()
            figures["matmul_peak_gflop_s"] = matmul_peak(seconds=1.0 if args.quick else 3.0)
        if "P1" in only or "P6" in only:
            figures["P1"] = bench_p1(policy, batch, prompt_len, gen, samples, args.quick, repeats)
        if "P6" in only:
            figures["P6_mfu"] = figures["P1"]["cached_gflop_s"] / figures["matmul_peak_gflop_s"]
        if "P3" in only:
            figures["P3"] = bench_p3(policy, p3_batches, prompt_len, p3_gen, repeats)
        if "P3T" in only:
            trained = args.trained or Path(tmp) / "trained"
            toy = QUICK_TOY if args.quick else TOY
            figures["P3T"] = bench_p3_trained(trained, toy, 16, [float(t) for t in args.thresholds.split(",")],
                                              repeats)
        if "F1" in only:
            f1 = (4, 16, 32, 8, 4) if args.quick else (4, 64, 128, 32, 16)  # batch, prompt, gen, block, steps/block
            figures["F1"] = bench_full_caches(model_dir, *f1, repeats)
            figures["F1"]["shape"] = "batch {}, prompt {}, gen {}, block {}, {} steps per block".format(*f1)
        figures["load_avg_1min_end"] = os.getloadavg()[0]
        figures["runs_started_on_a_quiet_machine"] = f"{QUIET['gated']}/{QUIET['gated'] + QUIET['ungated']}"
        print(json.dumps(figures, indent=2))
        if args.profile:
            print(profile_cached(policy, batch, prompt_len, 32 if args.quick else 64))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
