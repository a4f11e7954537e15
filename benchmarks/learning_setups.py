"""The learning benchmark's tasks (benchmarks/learning.py): generator parameters or data files, the verifier as
reward, the response budget and the SFT run of each; the --sft-sweep starting points."""
from __future__ import annotations


def _countdown_answers(answer_format: str, max_tokens: int) -> dict:
    """The countdown setup's problems and held-out items answered in another `answer_format` (rl.tasks Countdown);
    `generator` names the rl.tasks generator where the setup's name is not one."""
    return {"generator": "countdown",
            "task_kwargs": {"num_train": 5000, "num_test": 600, "reject_shortcuts": ["sum", "product"],
                            "answer_format": answer_format},
            "max_tokens": max_tokens,
            "reward": {"fn": "rl.tasks:countdown_reward", "kwargs": {"format_score": 0.1}},
            "sft": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, steps=800, batch_size=64, lr=1e-3)}


# Toy tasks the benchmark can run: generator parameters, the verifier as reward, the response budget, the SFT run.
SETUPS = {
    # Countdown: many equations reach a target, the SFT data shows one: the verifier rewards any, which RL can use.
    # format_score pays 0.1 for a well-formed equation on the given numbers (TinyZero's shaping).
    # Shortcut-free (issue 19): targets equal to the plain sum or product of the numbers are redrawn (with them,
    # 19.5% of training and 25% of the first 200 held-out targets were the sum, and every TraceRL gain was that
    # shortcut); 600 held-out items so that a ~6-point paired gain can reach p < 0.01. The tables before
    # 2026-11-30 used {"num_train": 5000, "num_test": 200}: --task-kwargs reproduces them.
    "countdown": {"task_kwargs": {"num_train": 5000, "num_test": 600, "reject_shortcuts": ["sum", "product"]},
                  "max_tokens": 16,
                  "reward": {"fn": "rl.tasks:countdown_reward", "kwargs": {"format_score": 0.1}},
                  "sft": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, steps=800, batch_size=64,
                              lr=1e-3)},
    # The same problems and held-out items with worked answers (`answer_format: steps`, `19-9=10,10+3=13`): the model
    # writes each intermediate result instead of doing the arithmetic silently (issue 19: the 0.53M model's implicit
    # arithmetic looked like the cap on what RL could sharpen). Answers are 11-20 characters (mean 14.7), hence 24
    # tokens.
    "countdown_steps": _countdown_answers("steps", max_tokens=24),
    # The same problems with search answers (`answer_format: search`): half the SFT answers first try a dead end and
    # reject it with `;` (`3+11=14,9+14=23;3*11=33,33+9=42`), so the model learns to finish a bad first step honestly
    # and try again instead of forcing the last step onto the target (issue 19). Answers are 11-39 characters (mean
    # 23.0), hence 40 tokens. A negative result (BENCHMARKS.md ## Learning): RL prunes the retries.
    "countdown_search": _countdown_answers("search", max_tokens=40),
    # Arithmetic: partial credit (0.5 x fraction of digits right) densifies the signal; accuracy is exact match.
    "arithmetic": {"task_kwargs": {"digits": 2, "num_train": 2000, "num_test": 200}, "max_tokens": 8,
                   "reward": {"fn": "rl.tasks:arithmetic_reward", "kwargs": {"partial_credit": True}},
                   "sft": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, steps=400, batch_size=64,
                               lr=1e-3)},
    # A third-party task: reasoning-gym's Countdown, its problems and scorer (benchmarks/learning_rg.py); data files
    # written on first use (`files`: set by main from --out / --sft), the same model, SFT and response budget.
    "rg_countdown": {"file_task": {"num_train": 5000, "num_test": 600}, "max_tokens": 16,
                     "reward": {"fn": "benchmarks.learning_rg:score"},
                     "sft": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, steps=800, batch_size=64,
                                 lr=1e-3)},
}


def generator(task: str) -> str:
    """The rl.tasks generator of a generated setup (its own name unless it names another)."""
    return SETUPS[task].get("generator", task)


def _data(task: str, data_seed: int | None = None) -> dict:
    """The data section of a task: a generated toy task, or the data files of a file task (SETUPS `files`)."""
    setup = SETUPS[task]
    if "file_task" in setup:
        files = setup.get("files")
        if not files:
            raise SystemExit(f"{task}: its data files are not written yet (main writes them)")
        return {"task": None, "task_kwargs": {}, "train": files["train"], "eval": files["test"]}
    return {"task": generator(task), "task_kwargs": setup["task_kwargs"],
            **({} if data_seed is None else {"task_seed": data_seed})}

# --sft-sweep: starting points (size x steps) with their held-out greedy accuracy and training time.
SFT_SWEEP = [
    ("arithmetic", dict(hidden_size=128, num_layers=2, steps=400)),
    ("arithmetic", dict(hidden_size=128, num_layers=2, steps=800)),
    ("arithmetic", dict(hidden_size=256, num_layers=2, steps=400)),
    ("arithmetic", dict(hidden_size=192, num_layers=4, steps=400)),
    ("countdown", dict(hidden_size=128, num_layers=2, steps=800)),
]
