"""Toy verifiers demand the answer format their prompt asks for: random text never scores, near-misses of the format
score 0 with their own reason, and the SFT data's answers (what `diffrl sft` teaches) stay exactly right.

Before the answer-line rule the arithmetic verifier took the first integer anywhere in the response, so
`Y=JGDP6&UH<u` scored 1.0 for `2+4=` (issue 11); the tests below marked "was 1.0" failed on that code.
"""
from __future__ import annotations

import random
import string

import pytest

from rl.tasks import arithmetic_reward, countdown_reward, make_task, sudoku_reward

REWARDS = {"arithmetic": arithmetic_reward, "countdown": countdown_reward, "sudoku": sudoku_reward}
TASK_KWARGS = {"arithmetic": {"digits": 2, "num_train": 200, "num_test": 20},
               "countdown": {"num_numbers": 3, "max_number": 9, "num_train": 200, "num_test": 20},
               "sudoku": {"num_train": 100, "num_test": 10}}


def _rows(name: str) -> list[dict]:
    task = make_task(name, seed=0, **TASK_KWARGS[name])
    return task.rows("train") + task.rows("test")


def test_the_reported_random_text_no_longer_scores():
    assert arithmetic_reward("2+4=", "Y=JGDP6&UH<u", "6") == {"score": 0.0, "reason": "bad_format",
                                                              "metrics": {"correct": 0.0}}  # was 1.0


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_sft_answers_score_one(name):
    """Every row's answer, as the SFT data writes it (answer, then EOS), is correct, alone or with the EOS text a
    decode that keeps special tokens leaves."""
    reward = REWARDS[name]
    for row in _rows(name):
        for response in (row["answer"], row["answer"] + "<|endoftext|>", " " + row["answer"] + "\n"):
            out = reward(row["prompt"], response, row["answer"])
            assert out["score"] == 1.0 and out["reason"] == "correct", (name, row, response, out)


def _random_text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


def _is_answer_shaped(name: str, text: str) -> bool:
    """Written from the prompts' formats, independently of the verifiers: the first non-empty line is an integer
    (arithmetic), an expression of digits and operators (countdown) or 16 digits with separators (sudoku)."""
    lines = [line.strip() for line in text.split("<|")[0].splitlines() if line.strip()]
    if not lines:
        return False
    first = lines[0]
    if name == "arithmetic":
        return first.lstrip("-").isascii() and first.lstrip("-").isdigit()
    if name == "countdown":
        return all(c in "0123456789+-*/() =" for c in first) and any(c.isdigit() for c in first)
    cells = first.replace(" ", "").replace("|", "").replace(",", "").replace("\t", "")
    return cells.isascii() and cells.isdigit() and len(cells) <= 16


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_random_text_never_scores(name):
    """2000 seeded random strings against the task's rows: one that is not answer-shaped (checked independently)
    scores 0 even with partial credit / format score; one that is scores only if it is right or partial credit
    pays it."""
    rng = random.Random(1234)
    rows = _rows(name)
    reward = REWARDS[name]
    shaped, scored_unshaped = 0, []
    for i in range(2000):
        text = _random_text(rng)
        row = rows[i % len(rows)]
        lenient = {"partial_credit": True} if name != "countdown" else {"format_score": 0.5}
        strict, graded = reward(row["prompt"], text, row["answer"]), reward(row["prompt"], text, row["answer"], **lenient)
        if _is_answer_shaped(name, text):
            shaped += 1
            assert strict["score"] in (0.0, 1.0) and (strict["score"] == 1.0) == (strict["reason"] == "correct")
        elif strict["score"] != 0.0 or graded["score"] != 0.0:
            scored_unshaped.append((text, row["answer"], strict, graded))
    assert scored_unshaped == []
    assert shaped < 100  # the test is about unshaped text: most of it must be


def test_random_text_with_the_answer_inside_never_scores():
    """The answer embedded in random text (after a non-answer first line, or inside a line) is not the answer line
    (was 1.0 whenever the answer was the first integer of the text)."""
    rng = random.Random(7)
    for row in _rows("arithmetic"):
        noise = "".join(rng.choice(string.ascii_letters + "=<&") for _ in range(8))
        for response in (f"{noise}{row['answer']}", f"{noise}\n{row['answer']}", f"x={row['answer']}",
                         f"{row['answer']}{noise}"):
            out = arithmetic_reward(row["prompt"], response, row["answer"])
            assert out["score"] == 0.0 and out["reason"] == "bad_format", (response, out)


NEAR_MISSES = [
    # (task, response, reference, reason): each violates the format the prompt asks for, or hedges
    ("arithmetic", "122 or 123", "122", "bad_format"),  # was 1.0 (first integer)
    ("arithmetic", "the answer is 122", "122", "bad_format"),  # was 1.0
    ("arithmetic", "= 122", "122", "bad_format"),  # was 1.0
    ("arithmetic", "122.0", "122", "bad_format"),  # was 1.0
    ("arithmetic", "1 2 2", "122", "bad_format"),
    ("arithmetic", "１２２", "122", "bad_format"),  # fullwidth digits: was no_answer, now said
    ("arithmetic", "١٢٢", "122", "bad_format"),  # Arabic-Indic digits: \d matched them, int() read them: was 1.0
    ("arithmetic", "9" * 5000, "122", "wrong"),  # int() of it would raise (Python's 4300-digit limit)
    ("arithmetic", "\n\n122", "122", "correct"),
    ("arithmetic", "-0", "0", "correct"),
    ("countdown", "16*(8-4) = 65", "16*(8-4)", "malformed"),  # claims another value: was 1.0
    ("countdown", "16*(8-4) = 64 = 65", "16*(8-4)", "malformed"),  # was 1.0
    ("countdown", "16*(8-4) = sixty-four", "16*(8-4)", "malformed"),  # was 1.0
    ("countdown", "１６*(8-4)", "16*(8-4)", "malformed"),
    ("countdown", "16*(8-4) = " + "6" * 5000, "16*(8-4)", "malformed"),
    ("countdown", "Answer:\n16*(8-4)", "16*(8-4)", "malformed"),
    ("countdown", "16*(8-4) = 64", "16*(8-4)", "correct"),
    ("sudoku", "solution: 1432342121434321", "1432342121434321", "bad_format"),  # was 1.0
    ("sudoku", "14323421214343211111", "1432342121434321", "bad_format"),  # 20 digits: was 1.0
    ("sudoku", "1432-3421-2143-4321", "1432342121434321", "bad_format"),  # was 1.0
    ("sudoku", "1432\n3421\n2143\n4321", "1432342121434321", "incomplete"),  # the answer is one line: was 1.0
    ("sudoku", "1432 3421 2143 4321", "1432342121434321", "correct"),
    ("sudoku", "1432342121434312", "1432342121434321", "wrong"),
]


@pytest.mark.parametrize("task, response, reference, reason", NEAR_MISSES)
def test_format_near_misses(task, response, reference, reason):
    out = REWARDS[task]("", response, reference)
    assert out["reason"] == reason
    assert out["score"] == (1.0 if reason == "correct" else 0.0)
