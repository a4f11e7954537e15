"""What every generated toy task shares: seeded generation of unique problems, disjoint splits, jsonl output.

A task draws problems one at a time from a numpy PCG64 generator seeded with (seed, task tag); each problem has a
canonical *key* (e.g. `12+34` and `34+12` share one). The first `num_test` distinct keys form the held-out test
split and the next `num_train` distinct keys the training split, so the splits are disjoint by construction and
each depends only on (seed, task parameters), never on the other split's size beyond that order.

Rows are plain dicts in the schema of a user's data file, `{"prompt": ..., "answer": ..., "task": ...}`: the
files written here load with `launch.data` (prompt_field "prompt", answer_field "answer") and with the
evaluation harness, which picks the verifier from the `task` column.

Verifiers read the answer where the prompt asks for it, in the form it asks for (`answer_line`): the first
non-empty line of the response, which must be exactly an integer (arithmetic), an equation (countdown) or a grid
(sudoku); anything else is `bad_format` / `malformed` and scores 0. Digits are ASCII only (`\\d` would also take
Arabic-Indic or fullwidth digits).

A verifier returns the reward result format of `rewards/` (a plain dict, so that `rl` does not import `rewards`):
`{"score": float, "reason": "correct" | "wrong" | "no_answer" | ..., "metrics": {str: float}}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable

import numpy as np

from rl.atomic_io import atomic_output
from rollout.errors import OneLineError

SPLITS = ("train", "test")
_SPLIT_ALIASES = {"train": "train", "test": "test", "eval": "test", "validation": "test", "heldout": "test"}


class TaskError(OneLineError):
    """Bad task parameters; the message is one line naming the parameter."""


def result(score: float, reason: str, **metrics: float) -> dict[str, Any]:
    """The reward result format of rewards/result.py (`make_result`), built without importing rewards/."""
    return {"score": float(score), "reason": reason, "metrics": {k: float(v) for k, v in metrics.items()}}


# Where a decoded response's text ends even when the tokenizer kept special tokens (`<|endoftext|>`, `<|im_end|>`).
_SPECIAL = "<|"


def answer_line(response: str) -> str | None:
    """The answer a toy task's prompt asks for: the response's first non-empty line, stripped, up to any special
    token. Every task prompt ends where the answer starts (`37+85=`), so the answer is what comes first; text after
    that line is never searched for something that happens to match (random text must not score)."""
    for line in response.split(_SPECIAL, 1)[0].splitlines():
        if line.strip():
            return line.strip()
    return None


def task_rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(seed), int(tag)]))


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TaskError(f"data.task_kwargs.{name}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise TaskError(f"data.task_kwargs.{name}: {value} outside {lo}..{'' if hi is None else hi}")
    return int(value)


class Task:
    """Base class: subclasses set `name`, `tag`, `verify = staticmethod(<module verifier>)` and implement `draw`."""

    name: str = ""
    tag: int = 0  # separates the random streams of tasks sharing a seed
    max_attempts_factor: int = 50  # draws allowed per wanted problem before the space counts as too small

    def __init__(self, *, seed: int = 0, num_train: int = 2000, num_test: int = 200):
        self.seed = check_int("seed", seed, 0)
        self.num_train = check_int("num_train", num_train, 1)
        self.num_test = check_int("num_test", num_test, 0)
        self._splits: dict[str, list[dict]] | None = None

    # ----------------------------------------------------------------------------------------- subclass API
    def draw(self, rng: np.random.Generator) -> tuple[Hashable, dict]:
        """One random problem: its canonical key and its row (prompt, answer, and any metadata)."""
        raise NotImplementedError

    @staticmethod
    def prompt_key(prompt: str) -> Hashable | None:
        """The canonical key of the problem a prompt of this task states (what `draw` returns with it), or None
        for text that is not such a prompt: the held-out check compares problems, not spellings."""
        return None

    @staticmethod
    def verify(response: str, reference: Any, **options: Any) -> dict[str, Any]:
        """Score a response against a reference answer (the task module's module-level verifier)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The generator's parameters, recorded in the rows' metadata-free config (for reports and file names)."""
        return {"seed": self.seed, "num_train": self.num_train, "num_test": self.num_test}

    # ------------------------------------------------------------------------------------------------ splits
    def _generate(self) -> dict[str, list[dict]]:
        rng = task_rng(self.seed, self.tag)
        wanted = self.num_test + self.num_train
        seen: set[Hashable] = set()
        rows: list[dict] = []
        attempts = 0
        while len(rows) < wanted:
            attempts += 1
            if attempts > self.max_attempts_factor * wanted + 1000:
                raise TaskError(f"data.task_kwargs: the {self.name} task found only {len(rows)} distinct problems "
                                f"in {attempts - 1} draws, {wanted} wanted (num_train + num_test); enlarge the "
                                f"problem space or ask for fewer")
            key, row = self.draw(rng)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"prompt": row.pop("prompt"), "answer": row.pop("answer"), "task": self.name, **row})
        return {"test": rows[:self.num_test], "train": rows[self.num_test:]}

    def rows(self, split: str) -> list[dict]:
        """The rows of `split` ("train" or "test"; "eval" is an alias of "test"), in generation order."""
        if split not in _SPLIT_ALIASES:
            raise TaskError(f"{self.name} task: unknown split {split!r} (train or test)")
        if self._splits is None:
            self._splits = self._generate()
        return [dict(row) for row in self._splits[_SPLIT_ALIASES[split]]]

    def items(self, split: str) -> list[tuple[str, str, dict]]:
        """(prompt, answer, metadata) triples: the interface `launch.data.load_prompts` reads tasks through."""
        out = self.rows(split)
        if not out:
            raise TaskError(f"data.task_kwargs.num_test: the {self.name} task has no {split} items")
        return [(r["prompt"], r["answer"], {k: v for k, v in r.items() if k not in ("prompt", "answer")})
                for r in out]

    def reward(self, prompt: str, response: str, reference: Any, **options: Any) -> dict[str, Any]:
        """The verifier in the reward-function signature of rewards/ (prompt, response, reference, **kwargs)."""
        return self.verify(response, reference, **options)

    def write(self, out_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
        """Write `<out_dir>/<name>_<split>.jsonl` through `datasets` (one JSON object a line); return the paths."""
        import datasets

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for split in splits:
            path = out_dir / f"{self.name}_{split}.jsonl"
            with atomic_output(path) as tmp:  # never a half-written data file under the final name
                datasets.Dataset.from_list(self.rows(split)).to_json(str(tmp), lines=True, force_ascii=False)
            paths[split] = path
        return paths
