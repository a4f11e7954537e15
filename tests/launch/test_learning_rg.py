"""The learning benchmark's third-party task (benchmarks/learning_rg.py): reasoning-gym's Countdown rows, unseen
held-out problems, its own scorer reached only by arithmetic text."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("reasoning_gym")

from benchmarks.learning_rg import _key, make_data, score


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_held_out_rows_are_unseen_problems(tmp_path):
    paths = make_data(tmp_path, num_train=300, num_test=60)
    train, test = _rows(paths["train"]), _rows(paths["test"])
    assert len(train) == 300 and len(test) == 60
    assert not {_key(r) for r in train} & {_key(r) for r in test}
    for row in test[:5]:
        numbers, target = row["metadata"]["numbers"], row["metadata"]["target"]
        assert row["prompt"] == f"{','.join(map(str, numbers))}->{target}:"
        assert " " not in row["answer"] and row["question"].startswith(("Calculate", "Using", "Find", "Make"))


def test_reasoning_gyms_scorer_on_the_first_line(tmp_path, monkeypatch):
    row = _rows(make_data(tmp_path, num_train=20, num_test=5)["test"])[0]
    assert score(row["prompt"], row["answer"] + "\nanything", None, row)["reason"] == "correct"
    wrong = score(row["prompt"], "1+2", None, row)
    assert wrong["reason"] == "wrong" and wrong["score"] == pytest.approx(0.05)  # reasoning-gym's own 0.05
    # Non-arithmetic text never reaches sympy's parse_expr (which evaluates Python).
    import benchmarks.learning_rg as rg

    seen = []
    real = rg._scorer()
    monkeypatch.setattr(rg, "_scorer", lambda: lambda answer, entry: seen.append(answer) or real(answer, entry))
    for text in ("__import__('os').system('true')", "print(1)", "1+1; 2"):
        assert score(row["prompt"], text, None, row)["reason"] == "no_answer"
    assert seen == [None, None, None]


def test_the_benchmark_builds_a_valid_recipe_on_its_files(tmp_path, monkeypatch):
    from benchmarks import learning

    paths = make_data(tmp_path / "data", num_train=20, num_test=5)
    monkeypatch.setitem(learning.SETUPS["rg_countdown"], "files", {k: str(v) for k, v in paths.items()})
    recipe = learning.build_recipe("tracerl", "rg_countdown", tmp_path / "sft", tmp_path / "out", 0, {})
    assert recipe.data.task is None and recipe.data.train == str(paths["train"])
    assert recipe.data.eval == str(paths["test"]) and recipe.reward[0].fn == "benchmarks.learning_rg:score"
