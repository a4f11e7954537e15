"""Generated toy tasks with held-out test splits and verifiers usable as rewards.

    from rl.tasks import make_task, TASK_REWARDS
    task = make_task("arithmetic", seed=0, digits=3, num_train=5000, num_test=200)
    task.rows("train")        # [{"prompt": "37+85=", "answer": "122", "task": "arithmetic"}, ...]
    task.items("eval")        # [(prompt, answer, meta)]: what launch.data.load_prompts reads
    task.write("data/")       # data/arithmetic_train.jsonl, data/arithmetic_test.jsonl (through `datasets`)
    arithmetic_reward(prompt, response, reference, partial_credit=False) -> {"score", "reason", "metrics"}

| task | prompt | answer | verifier |
|---|---|---|---|
| arithmetic | `37+85=` | `122` | the answer line is exactly an integer equal to the answer |
| countdown | `3,5,7->22:` | `3*5+7` (a solution) | the answer line is an equation on exactly those numbers, each once, equal to the target |
| countdown, `answer_format: steps` | `3,5,7->22:` | `3*5=15,15+7=22` | or a chain of true steps using those numbers (and its own results) once each |
| sudoku | `1030302020034001=` | `1432342121434321` | the answer line is 16 digits equal to the (unique) solution |

The answer line is the response's first non-empty line (`rl.tasks.base.answer_line`): what the prompt asks for
comes first, in the prompt's own format; random text, or a number found further on, never scores.

Recipes name a verifier by its task name, a rewards/ built-in (`reward: [{fn: arithmetic, kwargs: {partial_credit:
true}}]`), or by module path (`rl.tasks:arithmetic_reward`); `register_rewards` plugs them into another registry.
Importing this package imports numpy only.
"""
from __future__ import annotations

from typing import Any, Callable

from rl.tasks.arithmetic import ArithmeticTask
from rl.tasks.arithmetic import verify as _arithmetic_verify
from rl.tasks.base import SPLITS, Task, TaskError
from rl.tasks.countdown import CountdownTask
from rl.tasks.countdown import verify as _countdown_verify
from rl.tasks.sudoku import SudokuTask
from rl.tasks.sudoku import verify as _sudoku_verify

__all__ = ["TASKS", "TASK_REWARDS", "Task", "TaskError", "SPLITS", "make_task", "task_names", "write_task",
           "ArithmeticTask", "CountdownTask", "SudokuTask", "arithmetic_reward", "countdown_reward",
           "sudoku_reward", "register_rewards", "verify"]

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ArithmeticTask, CountdownTask, SudokuTask)}


def task_names() -> list[str]:
    return sorted(TASKS)


def make_task(name: str, *, seed: int = 0, **kwargs: Any) -> Task:
    """A generated task by name; unknown names and parameters fail with one line naming `data.task(_kwargs)`."""
    if name not in TASKS:
        raise TaskError(f"data.task: unknown task {name!r} (expected one of {', '.join(task_names())})")
    try:
        return TASKS[name](seed=seed, **kwargs)
    except TypeError as err:
        raise TaskError(f"data.task_kwargs: {name}: {err}") from None


def write_task(name: str, out_dir: str, *, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Generate task `name` and write its train and test jsonl files to `out_dir`; return their paths."""
    return make_task(name, seed=seed, **kwargs).write(out_dir)


# ------------------------------------------------------------------------------------------------ rewards
# Signature of rewards/ functions: fn(prompt, response, reference, **options) -> {"score", "reason", "metrics"}.
# No catch-all **kwargs: an option a verifier does not take fails at recipe validation instead of being ignored.
def arithmetic_reward(prompt: str, response: str, reference: Any, *, partial_credit: bool = False) -> dict[str, Any]:
    """Arithmetic verifier: 1.0 when the answer line is an integer equal to the reference (see arithmetic.py)."""
    return _arithmetic_verify(response, reference, partial_credit=partial_credit)


def countdown_reward(prompt: str, response: str, reference: Any, *, format_score: float = 0.0,
                     step_credit: float = 0.0) -> dict[str, Any]:
    """Countdown verifier: an equation on exactly the reference's numbers reaching its target (see countdown.py)."""
    return _countdown_verify(response, reference, format_score=format_score, step_credit=step_credit)


def sudoku_reward(prompt: str, response: str, reference: Any, *, partial_credit: bool = False) -> dict[str, Any]:
    """Sudoku verifier: the answer line is the solution's 16 digits (see sudoku.py)."""
    return _sudoku_verify(response, reference, partial_credit=partial_credit, prompt=prompt)


TASK_REWARDS: dict[str, Callable[..., dict[str, Any]]] = {
    "arithmetic": arithmetic_reward, "countdown": countdown_reward, "sudoku": sudoku_reward,
}


def verify(task: str, response: str, reference: Any, **options: Any) -> dict[str, Any]:
    """Score one response with task `task`'s verifier."""
    if task not in TASK_REWARDS:
        raise TaskError(f"task: unknown task {task!r} (expected one of {', '.join(task_names())})")
    return TASK_REWARDS[task]("", response, reference, **options)


def register_rewards(register: Callable[..., Any]) -> None:
    """Register the task verifiers under their task names with a rewards registry's `register(name)` decorator
    (e.g. `register_rewards(REWARDS.register)`), so recipes can say `reward: [{fn: arithmetic}]`."""
    for name, fn in TASK_REWARDS.items():
        register(name)(fn)
