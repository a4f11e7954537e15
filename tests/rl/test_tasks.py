"""Toy tasks: seeded generation, disjoint held-out splits, verifiers as rewards, jsonl in the user-file schema."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from rl.tasks import (
    TASK_REWARDS,
    TASKS,
    TaskError,
    arithmetic_reward,
    countdown_reward,
    make_task,
    register_rewards,
    sudoku_reward,
    verify,
)
from rl.tasks.countdown import evaluate, parse_reference
from rl.tasks.sudoku import all_grids, count_solutions, is_valid_grid

SMALL = {"arithmetic": dict(digits=3), "countdown": dict(), "sudoku": dict()}


def _key(name: str, row: dict):
    prompt = row["prompt"]
    if name == "arithmetic":
        op = next(c for c in prompt[1:] if c in "+-*")
        a, b = prompt.rstrip("=").split(op, 1)
        return op, frozenset((int(a), int(b))) if op != "-" else (int(a), int(b))
    if name == "countdown":
        nums, target = prompt.rstrip(":").split("->")
        return tuple(sorted(int(n) for n in nums.split(","))), int(target)
    return prompt


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_seeded_and_splits_are_disjoint(name):
    task = make_task(name, seed=3, num_train=600, num_test=100, **SMALL[name])
    train, test = task.rows("train"), task.rows("test")
    assert len(train) == 600 and len(test) == 100
    assert task.rows("eval") == test  # the alias launch.data uses
    again = make_task(name, seed=3, num_train=600, num_test=100, **SMALL[name])
    assert again.rows("train") == train and again.rows("test") == test
    assert make_task(name, seed=4, num_train=600, num_test=100, **SMALL[name]).rows("test") != test
    # The held-out split does not depend on how much training data is asked for.
    assert make_task(name, seed=3, num_train=50, num_test=100, **SMALL[name]).rows("test") == test
    train_keys, test_keys = {_key(name, r) for r in train}, {_key(name, r) for r in test}
    assert len(train_keys) == 600 and len(test_keys) == 100 and not train_keys & test_keys
    for row in train + test:
        assert set(row) == {"prompt", "answer", "task"} and row["task"] == name
        assert TASK_REWARDS[name](row["prompt"], row["answer"], row["answer"])["score"] == 1.0
    items = task.items("train")
    assert items[0] == (train[0]["prompt"], train[0]["answer"], {"task": name})


def test_arithmetic_format_operands_and_verifier():
    task = make_task("arithmetic", seed=0, digits=3, min_digits=2, ops="+-*", num_train=500, num_test=50)
    ops_seen = set()
    for row in task.rows("train"):
        prompt = row["prompt"]
        op = next(c for c in prompt[1:] if c in "+-*")
        ops_seen.add(op)
        a, b = (int(x) for x in prompt[:-1].split(op))
        assert 10 <= a <= 999 and 10 <= b <= 999 and prompt.endswith("=")
        assert int(row["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
    assert ops_seen == {"+", "-", "*"}
    assert arithmetic_reward("37+85=", "122", "122")["reason"] == "correct"
    assert arithmetic_reward("", " 122<|endoftext|>", "122")["score"] == 1.0
    assert arithmetic_reward("", "0122", "122")["score"] == 1.0
    assert arithmetic_reward("", "121", "122") == {"score": 0.0, "reason": "wrong", "metrics": {"correct": 0.0}}
    assert arithmetic_reward("", "abc", "122")["reason"] == "bad_format"
    assert arithmetic_reward("", " \n ", "122")["reason"] == "no_answer"
    assert arithmetic_reward("", "132", "122", partial_credit=True)["score"] == pytest.approx(0.5 * 2 / 3)
    assert arithmetic_reward("", "12", "1.5")["reason"].startswith("error")


def test_countdown_expression_rules():
    assert evaluate("3*5+7") == 22 and evaluate("(8-4)*16") == 64 and evaluate("7/2") * 2 == 7
    for bad in ("2**10", "-3+5", "3//2", "__import__('os')", "4/(2-2)", "3 5", "03+1", "1+" * 150 + "1", ""):
        assert evaluate(bad) is None, bad
    assert parse_reference("16*(8-4)") == ([4, 8, 16], 64)
    assert parse_reference('{"numbers": [4, 8, 16], "target": 64}') == ([4, 8, 16], 64)
    ref = "16*(8-4)"
    assert countdown_reward("", "(8-4)*16", ref)["reason"] == "correct"
    assert countdown_reward("", "16*(8-4) = 64\nmore text", ref)["score"] == 1.0
    assert countdown_reward("", "16*8-4", ref)["reason"] == "wrong"
    assert countdown_reward("", "16*8-4", ref, format_score=0.1)["score"] == 0.1
    assert countdown_reward("", "16*4", ref)["reason"] == "wrong_numbers"  # 8 unused
    assert countdown_reward("", "16*(8-4)*1", ref)["reason"] == "wrong_numbers"  # an extra number
    assert countdown_reward("", "import os", ref)["reason"] == "malformed"
    assert countdown_reward("", "  \n", ref)["reason"] == "no_answer"
    assert countdown_reward("", "1", "{not json")["reason"].startswith("error")
    task = make_task("countdown", seed=0, num_numbers=4, max_number=9, max_target=30, division=True,
                     num_train=200, num_test=20)
    for row in task.rows("train"):
        nums, target = row["prompt"][:-1].split("->")
        assert len(nums.split(",")) == 4 and 1 <= int(target) <= 30
        assert parse_reference(row["answer"]) == (sorted(int(n) for n in nums.split(",")), int(target))


def test_sudoku_grids_puzzles_and_verifier():
    grids = all_grids()
    assert grids.shape == (288, 16) and len({g.tobytes() for g in grids}) == 288
    assert all(is_valid_grid(g) for g in grids)
    task = make_task("sudoku", seed=1, min_blanks=6, max_blanks=9, num_train=100, num_test=10)
    for row in task.rows("train") + task.rows("test"):
        puzzle = np.array([int(c) for c in row["prompt"][:-1]], dtype=np.int8)
        solution = np.array([int(c) for c in row["answer"]], dtype=np.int8)
        assert 6 <= int((puzzle == 0).sum()) <= 9 and count_solutions(puzzle) == 1
        assert is_valid_grid(solution) and np.all((puzzle == solution) | (puzzle == 0))
    ref = "1432342121434321"
    assert sudoku_reward("", "1432|3421|2143|4321", ref)["reason"] == "correct"
    wrong = sudoku_reward("", "1432342121434312", ref, partial_credit=True)
    assert wrong["reason"] == "wrong" and wrong["score"] == pytest.approx(0.5 * 14 / 16)
    assert sudoku_reward("", "1432", ref)["reason"] == "incomplete"
    assert sudoku_reward("", "none", ref)["reason"] == "bad_format"
    assert sudoku_reward("", "", ref)["reason"] == "no_answer"


def test_sudoku_grid_count_by_brute_force():
    # Independent of the enumerator: filter all 4!^4 row-permutation grids by the Sudoku rules.
    rows = np.array(list(itertools.permutations(range(1, 5))), dtype=np.int64)
    pick = np.array(list(itertools.product(range(24), repeat=4)))
    grids = rows[pick].reshape(-1, 4, 4)  # (24^4, 4, 4), every row already a permutation
    bits = 1 << grids
    cols_ok = (bits.sum(axis=1) == 30).all(axis=1)
    boxes = bits.reshape(-1, 2, 2, 2, 2).sum(axis=(2, 4))  # (N, box row, box col)
    valid = cols_ok & (boxes == 30).all(axis=(1, 2))
    assert int(valid.sum()) == 288
    found = {g.tobytes() for g in grids[valid].reshape(-1, 16).astype(np.int8)}
    assert found == {g.tobytes() for g in all_grids()}


def test_files_have_the_user_schema(tmp_path):
    from launch.data import read_rows

    task = make_task("countdown", seed=0, num_train=30, num_test=5)
    paths = task.write(tmp_path)
    assert sorted(paths) == ["test", "train"] and paths["train"].name == "countdown_train.jsonl"
    rows = read_rows(paths["train"], "prompt", "answer")
    assert rows == task.rows("train")
    assert read_rows(paths["test"], "prompt", "answer") == task.rows("test")
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_parameters_fail_with_one_line():
    cases = [
        (dict(name="nope"), "data.task: unknown task 'nope'"),
        (dict(name="arithmetic", digits=0), "data.task_kwargs.digits: 0 outside 1..9"),
        (dict(name="arithmetic", ops="+/"), "data.task_kwargs.ops"),
        (dict(name="arithmetic", digits=1, num_train=100, num_test=10), "exceeds the 55 distinct problems"),
        (dict(name="arithmetic", digits="2"), "expected an integer"),
        (dict(name="sudoku", max_blanks=13), "data.task_kwargs.max_blanks"),
        (dict(name="countdown", colour=1), "data.task_kwargs: countdown:"),
        (dict(name="countdown", division="yes"), "data.task_kwargs.division"),
    ]
    for kwargs, message in cases:
        name = kwargs.pop("name")
        with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
            make_task(name, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(TaskError, match="found only"):
        make_task("countdown", num_numbers=2, max_number=3, max_target=9, num_train=50, num_test=5).rows("train")
    with pytest.raises(TaskError, match="no test items"):
        make_task("arithmetic", num_test=0).items("test")
    with pytest.raises(TaskError, match="unknown task"):
        verify("chess", "e4", "e4")


def test_register_rewards_plugs_into_a_registry():
    from rl.registry import Registry

    table = Registry("reward")
    register_rewards(table.register)
    assert table.names() == ["arithmetic", "countdown", "sudoku"]
    assert table.get("arithmetic")("1+1=", "2", "2")["score"] == 1.0


def test_verifiers_load_through_the_rewards_registry():
    from rewards.registry import kind_of, load_fn, register_reward

    for name in TASK_REWARDS:
        fn = load_fn(f"rl.tasks:{name}_reward")  # what a recipe's `fn: rl.tasks:<task>_reward` resolves to
        assert fn is TASK_REWARDS[name] and kind_of(fn) == "single"
    register_rewards(register_reward)  # the driver (or rewards' built-ins) can expose them as `fn: <task>`
    assert load_fn("countdown")("", "3*5+7", "7+3*5")["score"] == 1.0
