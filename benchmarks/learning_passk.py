"""How far can RL sharpen this model? Greedy accuracy and pass@k (temperature-1 sampling, the RL rollouts' decoding)
of checkpoints on the held-out test split and on as many items of the TRAINING split, for issue 19.

RL with a group-relative advantage mostly converts pass@k into pass@1: a problem none of k samples solves gives no
gradient, so pass@k of the start bounds what a few hundred steps can teach. Comparing train and test tells whether
the rollouts see the same difficulty the held-out evaluation does.

    python benchmarks/learning_passk.py /work/bench/fid/sft [CKPT ...] --n 16 --items 200
    python benchmarks/learning_passk.py --chance --items 300     # Countdown: pass@k of guessing uniformly

Countdown's answer space is small (~150 expressions of three numbers), so a large-k pass rate is mostly reach by
chance: `--chance` prints what a uniform pick among all of them scores, the floor to read the model's pass@k against.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

from benchmarks.learning import SETUPS, generator


def passk_table(ckpt: str, task: str, seed: int, items: int, n: int, ks: tuple[int, ...],
                splits: tuple[str, ...] = ("test", "train")) -> dict:
    from launch.evaluate import EvalRun, evaluate_sets, load_checkpoint_policy, load_eval_sets
    from launch.evaluate_data import items_from_rows
    from rl.tasks import make_task

    common = dict(data=[generator(task)], task_kwargs=SETUPS[task]["task_kwargs"], task_seed=seed, limit=items,
                  print_table=False, max_tokens=SETUPS[task]["max_tokens"], overlap="allow")
    runs = {"greedy": EvalRun(rollout={"temperature": 0.0, "batch_size": 64}, **common),
            "sampled": EvalRun(n=n, k=ks, rollout={"temperature": 1.0, "batch_size": 64}, **common)}
    policy = load_checkpoint_policy(ckpt, runs["greedy"])
    out: dict = {}
    for split in splits:
        for mode, run in runs.items():
            (evalset,) = load_eval_sets(ckpt, run, sources=[])
            if split == "train":  # the same generator's training rows (what the RL rollouts are drawn from)
                rows = make_task(generator(task), seed=seed, **SETUPS[task]["task_kwargs"]).rows("train")[:items]
                evalset.items = items_from_rows(rows, "task", generator(task))
            ((s, _),) = evaluate_sets(policy, [evalset], run, checkpoint_name=ckpt, progress=False)
            out[f"{split}/{mode}"] = {k: v for k, v in s.items() if k.startswith(("avg@", "pass@"))}
    return out


def countdown_expressions(numbers: list[int], ops: str = "+-*") -> set[str]:
    """Every expression using each of three numbers once: all orders, two operators, both bracketings."""
    out: set[str] = set()
    for a, b, c in itertools.permutations(numbers):
        for o1, o2 in itertools.product(ops, repeat=2):
            out |= {f"{a}{o1}{b}{o2}{c}", f"({a}{o1}{b}){o2}{c}", f"{a}{o1}({b}{o2}{c})"}
    return out


def chance_passk(seed: int, items: int, ks: tuple[int, ...], split: str = "test") -> dict[str, float]:
    """pass@k of k independent uniform picks among an item's expressions, averaged over the split's first items
    (the benchmark's Countdown: three numbers, + - *, checked by the task's own verifier)."""
    from rl.tasks import make_task

    task = make_task("countdown", seed=seed, **SETUPS["countdown"]["task_kwargs"])
    hit_rates = []
    for row in task.rows(split)[:items]:
        numbers = [int(x) for x in row["prompt"].split("->")[0].split(",")]
        exprs = countdown_expressions(numbers)
        hits = sum(task.reward(row["prompt"], e, row["answer"])["score"] == 1.0 for e in exprs)
        hit_rates.append(hits / len(exprs))
    return {f"pass@{k}": sum(1 - (1 - h) ** k for h in hit_rates) / len(hit_rates) for k in ks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--chance", action="store_true", help="Countdown: the uniform-guess pass@k instead")
    parser.add_argument("--task", default="countdown", choices=sorted(SETUPS))
    parser.add_argument("--seed", type=int, default=0, help="the task generator's seed (the SFT run's)")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--splits", default="test,train", help="comma list of test, train")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ks = tuple(k for k in (1, 2, 4, 8, 16, 32) if k <= args.n)
    if args.chance:
        for split in args.splits.split(","):
            res = chance_passk(args.seed, args.items, ks, split)
            print(f"uniform guess {split}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in res.items()), flush=True)
        return
    for ckpt in args.checkpoints:
        res = passk_table(ckpt, args.task, args.seed, args.items, args.n, ks, tuple(args.splits.split(",")))
        print(json.dumps({"checkpoint": ckpt, **res}), flush=True)
        for key, figures in res.items():
            print(f"{ckpt} {key}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
