"""Held-out means held out: evaluation items whose prompt was also trained on are refused, dropped or allowed, by
an explicit choice, never silently scored as "held-out".

    sources = training_sources(recipe_mapping, policy_dir)          # [(where, [prompt text, ...]), ...]
    keep = check_heldout(eval_texts, sources, overlap="refuse", where="--data x.jsonl")

Prompts are compared after `launch.eval_stats.normalise_prompt` (NFKC, case-folded, whitespace collapsed), and
against a generated task's training data by problem (`Task.prompt_key`: `3,5,7->22:` and `7,3,5->22:` are one
countdown problem, `12+34=` and `34+12=` one sum). The
default is to refuse: a held-out figure computed partly on training items overstates generalisation, and the
reader of a table has no way to tell. "drop" evaluates the disjoint rest (and says how many were left out);
"allow" evaluates everything (e.g. a deliberate training-set accuracy) and logs a warning.

Generated toy tasks (rl.tasks) are disjoint by construction within one generator seed and num_test (one stream of
distinct problem keys, the first `num_test` are the test split: rl/tasks/base.py); across seeds they are not (a
run generating its training problems with another seed trains on about half of the held-out problems of
countdown's 5000/200 split), which is what the check catches.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Hashable, Literal, Sequence

from launch.data import DataError
from launch.eval_stats import overlapping_prompts

log = logging.getLogger(__name__)

__all__ = ["HeldoutOverlapError", "OVERLAP_CHOICES", "check_heldout", "training_sources", "task_train_prompts"]

OVERLAP_CHOICES = ("refuse", "drop", "allow")
Overlap = Literal["refuse", "drop", "allow"]
# (where, training prompts, the problem key of a prompt or None: plain normalised text)
Source = tuple[str, list[str], Callable[[str], Hashable | None] | None]


class HeldoutOverlapError(DataError):
    """Evaluation items that were also trained on; one line naming how many, an example and the training source."""


def task_train_prompts(task: str, task_kwargs: dict | None, seed: int) -> list[str]:
    """The training split's prompts of a generated task."""
    from rl.tasks import make_task

    return [row["prompt"] for row in make_task(task, seed=seed, **(task_kwargs or {})).rows("train")]


def _file_prompts(path: str, prompt_field: str) -> list[str]:
    from launch.evaluate_data import _read_file  # the eval harness's reader: any row shape

    rows = _read_file(Path(path))
    return [str(row[prompt_field]) for row in rows if isinstance(row.get(prompt_field), str)]


def _data_sources(data: dict, seed: int, origin: str) -> list[Source]:
    if data.get("task"):
        from rl.tasks import TASKS

        task_seed = int(seed if data.get("task_seed") is None else data["task_seed"])
        return [(f"{origin} data.task {data['task']!r} (seed {task_seed})",
                 task_train_prompts(data["task"], data.get("task_kwargs"), task_seed), TASKS[data["task"]].prompt_key)]
    train = data.get("train") or data.get("file")
    if train and Path(train).is_file():
        return [(f"{origin} training file {train}", _file_prompts(train, data.get("prompt_field") or "prompt"), None)]
    return []


def training_sources(recipe: dict | None, policy_dir: Path | None) -> list[Source]:
    """What a checkpoint was trained on, as far as its directory tells: the RL run's recipe data section, and the
    SFT data recorded in `sft.json` of the policy directory or of the recipe's starting model."""
    sources: list[Source] = []
    if recipe and recipe.get("data"):
        sources += _data_sources(recipe["data"], int(recipe.get("seed", 0)), "the run's")
    sft_dirs = [d for d in (policy_dir, Path(((recipe or {}).get("model") or {}).get("path") or "")) if d]
    for folder in sft_dirs:
        sft = Path(folder) / "sft.json"
        if sft.is_file():
            data: dict[str, Any] = json.loads(sft.read_text()).get("data") or {}
            sources += _data_sources(data, int(data.get("task_seed") or 0), f"SFT ({sft})")
            break
    return sources


def check_heldout(eval_texts: Sequence[str], sources: Sequence[Source], *, overlap: Overlap,
                  where: str) -> list[int]:
    """Indices of the evaluation items to keep. `overlap`: refuse (raise HeldoutOverlapError when any prompt was
    trained on), drop (keep the others; none left is an error too) or allow (keep all, warn)."""
    if overlap not in OVERLAP_CHOICES:
        raise ValueError(f"overlap: {overlap!r} is not one of {', '.join(OVERLAP_CHOICES)}")
    hits: set[int] = set()
    first: tuple[str, int] | None = None
    for name, prompts, key in sources:
        found = overlapping_prompts(prompts, eval_texts, key)
        if found and first is None:
            first = (name, found[0])
        hits.update(found)
    if not hits:
        return list(range(len(eval_texts)))
    name, index = first  # type: ignore[misc]
    what = (f"{where}: {len(hits)} of {len(eval_texts)} evaluation prompts are also in {name} (e.g. item {index}: "
            f"{eval_texts[index][:60]!r})")
    if overlap == "refuse":
        raise HeldoutOverlapError(f"{what}; not a held-out set. Evaluate the disjoint rest with overlap 'drop' "
                                  f"(data.eval_overlap / --overlap drop) or score them anyway with 'allow'")
    if overlap == "allow":
        log.warning("%s: scored anyway (overlap 'allow'): NOT a held-out figure", what)
        return list(range(len(eval_texts)))
    keep = [i for i in range(len(eval_texts)) if i not in hits]
    if not keep:
        raise HeldoutOverlapError(f"{what}: nothing left after dropping them")
    log.warning("%s: left out (overlap 'drop'), %d items evaluated", what, len(keep))
    return keep
