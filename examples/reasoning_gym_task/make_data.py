"""Write a reasoning-gym dataset as the JSONL files diffrl reads (README, "Custom tasks").

    python examples/reasoning_gym_task/make_data.py                  # basic_arithmetic, 256 train + 64 test rows
    python examples/reasoning_gym_task/make_data.py --dataset countdown --train 64 --test 16

Each row is reasoning-gym's own entry unchanged: {"question", "answer", "metadata"}. The recipe beside this file
reads `question` as the prompt (data.prompt_field), and its reward gets `metadata` / the whole `row` by naming them
(examples/rewards/reasoning_gym_reward.py). Train and test rows come from different seeds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_rows(dataset: str, size: int, seed: int, path: Path) -> Path:
    import reasoning_gym

    rows = list(reasoning_gym.create_dataset(dataset, size=size, seed=seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="basic_arithmetic", help="a reasoning-gym dataset name")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE / "data", help="folder for train.jsonl and test.jsonl")
    args = p.parse_args(argv)
    for name, size, seed in (("train", args.train, 0), ("test", args.test, 1)):
        print(write_rows(args.dataset, size, seed, args.out / f"{name}.jsonl"))


if __name__ == "__main__":
    main()
