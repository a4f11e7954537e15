"""Prompt data for RL: a file (jsonl / json / parquet read through `datasets`) or a generated toy task, encoded
once with the policy's tokenizer, and served in a deterministic order that a cursor can resume exactly.

    prompts = load_prompts(recipe.data, tokenizer, split="train", seed=recipe.seed)
    sampler = PromptSampler(len(prompts), seed=recipe.seed, shuffle=recipe.data.shuffle)
    batch = [prompts[i] for i in sampler.take(recipe.data.num_prompts_per_step)]
    sampler.state_dict()  # {"position": ..., ...}: saved in every checkpoint

Order: epoch e visits the rows in the permutation drawn from numpy's PCG64 seeded with (seed, e): it depends on
nothing but the seed, the epoch and the number of rows, so a resumed run sees exactly the prompts the
uninterrupted run would have, across epoch boundaries too.

Bad input fails here, before anything starts, with one line naming the file, the row and the field
(`DataError`). Generated toy tasks (`data.task`) come from `rl.tasks` (arithmetic, countdown, sudoku).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rollout.errors import OneLineError

log = logging.getLogger(__name__)

__all__ = ["DataError", "Prompt", "PromptSampler", "load_prompts", "read_rows", "encode_prompt", "reward_item",
           "shard"]


class DataError(OneLineError):
    """A dataset that cannot be used; the message is one line naming the file (or task), row and field."""


@dataclass(frozen=True)
class Prompt:
    index: int  # row index in its source: stable across runs and resumes, used in request ids and the store
    prompt_ids: tuple[int, ...]  # token ids exactly as the model sees them (chat template applied)
    text: str  # the raw prompt (before the chat template)
    answer: str  # ground truth handed to the reward
    meta: dict[str, Any] = field(default_factory=dict)  # other columns of the row (e.g. tests for code rewards)


# What a reward item holds besides the row's own columns; a column of one of these names is shadowed (see
# rewards/specs.py: the scored text, the reference, the token count, the whole row).
RESERVED_ITEM_FIELDS = ("prompt", "response", "reference", "response_len", "row")


def reward_item(prompt: Prompt, response: str, response_len: int, *, prompt_field: str = "prompt",
                answer_field: str = "answer") -> dict[str, Any]:
    """The item a reward scores: prompt text, response, reference answer, the response's token count, every other
    column of the data row under its own name (e.g. reasoning-gym's `metadata`), and the whole row as `row` (its
    prompt and answer columns under their own names too), so a third-party scorer can take the row as it made it."""
    row = {prompt_field: prompt.text, answer_field: prompt.answer, **prompt.meta}
    columns = {k: v for k, v in prompt.meta.items() if k not in RESERVED_ITEM_FIELDS}
    return {**columns, "prompt": prompt.text, "response": response, "reference": prompt.answer,
            "response_len": int(response_len), "row": row}


# ------------------------------------------------------------------------------------------------ sampling order
class PromptSampler:
    """Deterministic, resumable order over `num_rows` rows: a fresh permutation per epoch, a single cursor."""

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool = True):
        if num_rows < 1:
            raise DataError("data: no prompts to sample from")
        self.num_rows, self.seed, self.shuffle = int(num_rows), int(seed), bool(shuffle)
        self.position = 0  # prompts handed out so far, over all epochs
        self._epoch, self._order = -1, np.arange(0)

    @property
    def epoch(self) -> int:
        return self.position // self.num_rows

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._epoch = epoch
        return self._order

    def take(self, k: int) -> list[int]:
        """The next k row indices (crossing into the next epoch when this one runs out)."""
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.position, self.num_rows)
            out.append(int(self._order_of(epoch)[offset]))
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int | bool]:
        return {"position": self.position, "num_rows": self.num_rows, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rows", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"data cursor: checkpoint has {key}={state[key]!r} but the data now has "
                                f"{getattr(self, key)!r} (the dataset or seed changed since the checkpoint)")
        self.position = int(state["position"])


# ------------------------------------------------------------------------------------------------------- files
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_rows(path: str | Path, prompt_field: str, answer_field: str, *, where: str = "data.train") -> list[dict]:
    """All rows of a data file as dicts, checked: the file is not empty, every row parses and has a non-empty
    prompt and an answer (launch/preflight.py scans it first, so a bad file fails naming its line)."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix)
    if fmt is None:
        raise DataError(f"{where}: {path}: unsupported file type {path.suffix!r} (.jsonl, .json, .parquet)")
    if not path.is_file():
        raise DataError(f"{where}: {path}: no such file")
    from launch.preflight import PreflightError, scan_data_file

    try:  # empty files, unparseable rows (counted, the first one's line named), missing fields: before datasets
        scan_data_file(path, prompt_field, answer_field, where=where)
    except PreflightError as err:
        raise DataError(str(err)) from None
    import datasets

    datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets")  # it logs the parse error itself; ours is the one line the user sees
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
    except (ValueError, OSError, TypeError, KeyError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise DataError(f"{where}: {path}: cannot read ({type(cause).__name__}: {cause})") from None
    finally:
        quiet.setLevel(level)
    columns = set(table.column_names)
    for name, wanted in (("prompt_field", prompt_field), ("answer_field", answer_field)):
        if wanted not in columns:
            raise DataError(f"{where}: {path}: no column {wanted!r} (data.{name}; columns: "
                            f"{', '.join(sorted(columns)) or 'none'})")
    rows = table.to_list()
    if not rows:
        raise DataError(f"{where}: {path}: no rows")
    for i, row in enumerate(rows):
        prompt, answer = row.get(prompt_field), row.get(answer_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: {path}: row {i}: field {prompt_field!r} is missing or not a non-empty string")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DataError(f"{where}: {path}: row {i}: no answer (field {answer_field!r} missing or empty)")
    return rows


def _answer_text(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    if isinstance(answer, (int, float)):
        return str(answer)
    return json.dumps(answer)  # lists / dicts (e.g. test cases): the reward parses them


def encode_prompt(tokenizer, text: str, *, chat_template: bool) -> list[int]:
    """Prompt token ids: the user turn under the tokenizer's chat template (with the generation prompt), or the
    raw text. No special tokens are added beyond the template's own."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template: true, but the model's tokenizer has no chat template "
                            "(set data.chat_template: false)")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def task_seed_of(data_cfg, seed: int) -> int:
    """The toy-task generator's seed: data.task_seed, else the run's seed."""
    task_seed = getattr(data_cfg, "task_seed", None)
    return int(seed if task_seed is None else task_seed)


def load_prompts(data_cfg, tokenizer, *, split: str = "train", seed: int = 0) -> list[Prompt]:
    """The prompts of `split` ("train" or "eval") from the recipe's data section, encoded with `tokenizer`; a toy
    task is generated with data.task_seed, else `seed`.

    Prompts longer than data.max_prompt_tokens are left out (counted in a warning); none left is an error.
    """
    if data_cfg.task is not None:
        from rl.tasks import TaskError, make_task

        try:
            items = make_task(data_cfg.task, seed=task_seed_of(data_cfg, seed), **data_cfg.task_kwargs).items(split)
        except TaskError as err:
            raise DataError(str(err)) from None
        where = f"data.task {data_cfg.task!r}"
    else:
        path = data_cfg.train if split == "train" else data_cfg.eval
        if path is None:
            raise DataError(f"data.{split}: no {split} file set")
        rows = read_rows(path, data_cfg.prompt_field, data_cfg.answer_field, where=f"data.{split}")
        items = [(row[data_cfg.prompt_field], _answer_text(row[data_cfg.answer_field]),
                  {k: v for k, v in row.items() if k not in (data_cfg.prompt_field, data_cfg.answer_field)})
                 for row in rows]
        where = f"data.{split}: {path}"
    prompts, too_long = [], 0
    for index, (text, answer, meta) in enumerate(items):
        ids = encode_prompt(tokenizer, text, chat_template=data_cfg.chat_template)
        if len(ids) > data_cfg.max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(index, tuple(ids), text, answer, meta))
    if too_long:
        log.warning("%s: %d of %d prompts longer than data.max_prompt_tokens=%d left out", where, too_long,
                    len(items), data_cfg.max_prompt_tokens)
    if not prompts:
        raise DataError(f"{where}: every prompt is longer than data.max_prompt_tokens={data_cfg.max_prompt_tokens}")
    return prompts


def shard(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Split into `parts` contiguous, nearly equal chunks (order kept)."""
    size, rest = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < rest else 0)
        out.append(list(items[start:end]))
        start = end
    return out
