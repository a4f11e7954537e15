"""Estimator benchmarks.

P4: TraceRL learner cost per response, our trajectory estimator (all blocks' j-th steps in one pass) vs a naive
    implementation with one forward per decoding step, 64 blocks of 4 tokens, 4 steps per block.
P5: variance (and, where the exact ELBO can be enumerated, bias and MSE) of each sequence-likelihood estimator at
    an equal forward budget; goal: SDMC gauss-3 variance <= 0.5x double Monte Carlo.

    python benchmarks/estimators.py            # full run (~2-3 minutes on 2 cores)
    python benchmarks/estimators.py --quick    # under a minute
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.estimators.elbo import score_draws
from rl.estimators.exact import exact_elbo
from rl.masking import MaskDraw, sample_generator
from rollout.models.loading import load_policy
from rollout.models.masks import sequence_bias
from rollout.models.tiny import make_tiny_policy


def naive_trajectory(policy, prompt, response, step_map, block_size):
    """One forward per decoding step over exactly the decoder's context at that step."""
    mask_id, p = policy.spec.mask_token_id, prompt.numel()
    total, forwards = torch.zeros(()), 0
    for step in torch.unique(step_map).tolist():
        now = step_map == step
        blk = int(torch.nonzero(now)[0]) // block_size
        end = (blk + 1) * block_size
        state = response[:end].clone()
        state[step_map[:end] >= step] = mask_id
        state[: blk * block_size] = response[: blk * block_size]
        bias = sequence_bias(p, end, block_size)
        seq = torch.cat([prompt, state])
        logits = policy.forward(seq[None], torch.arange(seq.numel())[None], bias).logits[0]
        rows = torch.nonzero(now).squeeze(-1)
        total = total + torch.log_softmax(logits[p + rows], -1).gather(-1, response[rows, None]).sum()
        forwards += 1
    return total, forwards


def bench_tracerl(policy, n_blocks: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    bs, spb = policy.spec.block_size, 4
    prompt = torch.randint(10, 90, (32,), generator=g)
    response = torch.randint(10, 90, (n_blocks * bs,), generator=g)
    step_map = torch.cat([blk * spb + torch.randperm(spb, generator=g) for blk in range(n_blocks)])
    inp = EstimatorInput([prompt], [response], ["r"], step_maps=[step_map], block_size=bs)
    estimator = get_estimator("trajectory")
    with torch.no_grad():
        ours = estimator(policy, inp)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            ours = estimator(policy, inp)
        ours_s = (time.perf_counter() - start) / repeats
        start = time.perf_counter()
        naive_total, naive_forwards = naive_trajectory(policy, prompt, response, step_map, bs)
        naive_s = time.perf_counter() - start
    agree = float((ours.seq_logp[0] - naive_total).abs())
    return {"blocks": n_blocks, "ours_forwards": ours.forwards, "naive_forwards": naive_forwards,
            "ours_s": ours_s, "naive_s": naive_s, "speedup": naive_s / ours_s, "abs_diff": agree}


def double_mc(policy, inp: EstimatorInput, seed: int, forwards: int):
    """Naive 'double' Monte Carlo: t ~ U(0, 1) and a Bernoulli(t) mask per forward, weight 1/t."""
    draws = []
    for b in range(len(inp)):
        gen = sample_generator(seed, inp.sample_keys[b])
        length = inp.length(b)
        t = torch.rand(forwards, generator=gen, dtype=torch.float64).clamp(min=1e-3)
        masks = torch.rand(forwards, length, generator=gen, dtype=torch.float64) < t[:, None]
        weights = torch.where(masks, (1.0 / (t * forwards))[:, None], torch.zeros(())).float()
        draws.append(MaskDraw(masks, weights, t))
    return score_draws(policy, inp, draws)


ESTIMATORS = [
    ("double MC (t~U, Bernoulli, 1/t)", None, {}),
    ("mc_elbo (LLaDA, l~U, L/l)", "mc_elbo", {"num_samples": 3, "stratified": False}),
    ("mc_elbo stratified", "mc_elbo", {"num_samples": 3}),
    ("sdmc gauss-3 (published 1/t)", "sdmc", {"nodes": 3}),
    ("sdmc gauss-3, count weights", "sdmc", {"nodes": 3, "weighting": "count"}),
    ("sdmc gauss-3, Bernoulli masks", "sdmc", {"nodes": 3, "count": "bernoulli"}),
    ("coupled t~U(0.2,0.8) x1 pair (2 fwd)", "coupled", {"num_pairs": 1}),
    ("random_mask x3", "random_mask", {"num_samples": 3}),
]


def bench_variance(policy, length: int, draws: int, with_exact: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 60, (6,), generator=g)
    response = torch.randint(10, 60, (length,), generator=g)
    inp = EstimatorInput([prompt] * draws, [response] * draws, [f"d{i}" for i in range(draws)])
    exact = exact_elbo(policy, prompt, response) if with_exact else None
    rows = []
    with torch.no_grad():
        for label, name, options in ESTIMATORS:
            est = double_mc(policy, inp, 7, 3) if name is None else get_estimator(name)(policy, inp, seed=7, **options)
            values = est.seq_logp.double()
            row = {"estimator": label, "forwards": est.forwards, "mean": float(values.mean()),
                   "var": float(values.var())}
            if exact is not None:
                row["bias"] = row["mean"] - exact
                row["mse"] = float(((values - exact) ** 2).mean())
            rows.append(row)
    base = rows[0]["var"]
    for row in rows:
        row["var_ratio"] = row["var"] / base
    return rows


def _sharp_policy(root: Path, length_hint: str):
    path = make_tiny_policy("llada", root / length_hint, seed=5, hidden_size=32, num_layers=2, num_heads=2,
                            num_kv_heads=1, intermediate_size=64)
    policy = load_policy(path)
    with torch.no_grad():  # sharpen so log-probs depend on the mask (a random init predicts ~uniformly)
        for name, p in policy.model.named_parameters():
            if "norm" not in name:
                p.mul_(6.0)
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768)
        block = load_policy(make_tiny_policy("block", root / "block", **size))
        print("## P4: TraceRL forwards per response (block 4, 4 steps per block)\n")
        print("| blocks | ours: forwards | naive: forwards | ours s/response | naive s/response | speed-up | |diff| |")
        print("|---|---|---|---|---|---|---|")
        for n_blocks in ([8, 16] if args.quick else [8, 64]):
            r = bench_tracerl(block, n_blocks, repeats=2 if args.quick else 3)
            print(f"| {r['blocks']} | {r['ours_forwards']} | {r['naive_forwards']} | {r['ours_s']:.3f} | "
                  f"{r['naive_s']:.3f} | {r['speedup']:.1f}x | {r['abs_diff']:.1e} |")
        sharp = _sharp_policy(root, "sharp")
        for length, with_exact in ((6, True), (32, False)):
            draws = 300 if args.quick else 1000
            print(f"\n## P5: sequence estimators, L = {length}, {draws} independent estimates, 3 forwards each"
                  + (" (exact ELBO by enumeration)" if with_exact else " (no exact value at this length)") + "\n")
            head = "| estimator | forwards | variance | var / double MC |" + (" bias | MSE |" if with_exact else "")
            print(head)
            print("|---" * (6 if with_exact else 4) + "|")
            for r in bench_variance(sharp, length, draws, with_exact):
                line = f"| {r['estimator']} | {r['forwards']} | {r['var']:.3f} | {r['var_ratio']:.3f} |"
                if with_exact:
                    line += f" {r['bias']:+.3f} | {r['mse']:.3f} |"
                print(line)


if __name__ == "__main__":
    main()
