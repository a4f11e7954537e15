"""A third-party task for the learning benchmark: reasoning-gym's Countdown, its problems and its own scorer.

    python benchmarks/learning.py --task rg_countdown --out bench/rg ...    # writes the data on first use

Problems: `reasoning_gym.create_dataset("countdown", ...)` as it comes (3 numbers in 1..20, targets 1..100, its
operators + - * /), training rows from seed 0 and held-out rows from seed 1,000,000 (its item i is seeded with seed + i); held-out problems whose (numbers,
target) also occur among the training rows are dropped here, so the held-out set is unseen problems (and the
evaluation's own overlap check, launch/heldout.py, runs on top). No shortcut filter: the generator is used as a
new user would.

Prompt and answer: the tiny character-level model cannot read reasoning-gym's 300-character English question, so
each row's prompt is the project's compact rendering of the same problem, `19,9,3->13:` (numbers in the
question's order), and the SFT answer is reasoning-gym's own solution expression without spaces. The row keeps
`question` and `metadata` unchanged, and the reward is reasoning-gym's scorer (`score_answer`, 1.0 right, 0.05
well-formed but wrong, 0.01 otherwise) applied to the response's first line. That line is only passed on when it
is nothing but digits, `+ - * /`, parentheses and spaces: reasoning-gym parses answers with sympy's `parse_expr`,
which evaluates Python, and model output is untrusted.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from rl.tasks.base import answer_line

DATASET = "countdown"
CONFIG = {"min_numbers": 3, "max_numbers": 3, "min_value": 1, "max_value": 20, "min_target": 1, "max_target": 100}
# reasoning-gym seeds item i of a dataset with seed + i: seeds 0 and 1 share all but one item, so the held-out
# rows come from a seed far past the training rows' range.
TRAIN_SEED, TEST_SEED = 0, 1_000_000
_SAFE = re.compile(r"^[0-9+\-*/() ]{1,64}$")


def _row(entry: dict) -> dict:
    meta = entry["metadata"]
    return {"prompt": f"{','.join(str(n) for n in meta['numbers'])}->{meta['target']}:",
            "answer": entry["answer"].replace(" ", ""), "question": entry["question"], "metadata": meta}


def _key(row: dict) -> tuple:
    return tuple(sorted(row["metadata"]["numbers"])), row["metadata"]["target"]


def make_data(out_dir: str | Path, num_train: int, num_test: int) -> dict[str, Path]:
    """Write train.jsonl and test.jsonl (held-out rows whose problem is a training one dropped, then the first
    `num_test`); existing files are kept. Returns their paths."""
    import reasoning_gym

    out_dir = Path(out_dir)
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [_row(e) for e in reasoning_gym.create_dataset(DATASET, size=num_train, seed=TRAIN_SEED, **CONFIG)]
    seen = {_key(r) for r in train}
    # three times the wanted size: many small problems recur across seeds
    candidates = [_row(e) for e in reasoning_gym.create_dataset(DATASET, size=3 * num_test, seed=TEST_SEED, **CONFIG)]
    test = [r for r in candidates if _key(r) not in seen][:num_test]
    if len(test) < num_test:
        raise SystemExit(f"rg_countdown: only {len(test)} unseen held-out problems of {len(candidates)} drawn")
    for name, rows in (("train", train), ("test", test)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@functools.cache
def _scorer():
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(DATASET)


def score(prompt: str, response: str, reference: Any, row: dict) -> dict[str, Any]:
    """reasoning-gym's Countdown scorer on the response's first line (only an arithmetic line reaches it)."""
    line = answer_line(response)
    answer = line if line is not None and _SAFE.match(line) else None
    value = float(_scorer()(answer, entry=row))
    reason = "correct" if value == 1.0 else "no_answer" if answer is None else "wrong"
    return {"score": value, "reason": reason, "metrics": {"correct": float(value == 1.0)}}
