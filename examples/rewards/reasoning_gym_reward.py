"""Example custom reward that needs the data row: reasoning-gym's own scorer, used as-is.

reasoning-gym (`pip install reasoning-gym`) generates rows {"question", "answer", "metadata"}; each dataset's
`score_answer(answer, entry)` reads what it needs from the row, often from `metadata` (countdown: the numbers and
the target). Write its rows to a jsonl file and point the recipe at it:

    data:
      train: rg_countdown.jsonl
      prompt_field: question
      answer_field: answer
    reward:
      - fn: examples/rewards/reasoning_gym_reward.py:score

The reward receives `row` (the whole data row, as reasoning-gym made it) because it names that parameter; a reward
can name a single column instead (`def score(prompt, response, reference, metadata)`). The answer is what the
response puts between <answer> tags (reasoning-gym's own convention and extractor).

Mind what the scorer runs: some reasoning-gym scorers parse the answer with sympy's `parse_expr`, which evaluates
Python; it runs in the reward worker, not in a sandbox.
"""
from __future__ import annotations

import functools
from typing import Any, Callable


@functools.lru_cache(maxsize=None)
def _scorer(dataset: str) -> Callable[..., float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset)


def score(prompt: str, response: str, reference: Any, row: dict, tag: str = "answer") -> dict[str, Any]:
    from reasoning_gym.utils import extract_answer

    metadata = row.get("metadata") or {}
    dataset = metadata.get("source_dataset")
    if not dataset:
        raise ValueError("the row's metadata has no 'source_dataset' (not a reasoning-gym row?)")
    answer = extract_answer(response, tag_name=tag)
    value = float(_scorer(dataset)(answer, entry=row))
    reason = "correct" if value == 1.0 else "no_answer" if answer is None else "wrong"
    return {"score": value, "reason": reason, "answered": float(answer is not None)}
