"""`diffrl eval` scores with reward functions (rewards.scorer.Scorer, as the driver does): the run's own recipe rewards
(custom ones included) for the run's own data, the built-in reward of each item's kind otherwise. Before, eval had
its own extractor: the last number anywhere for math, the task verifier called directly, no custom reward."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from launch.cli import eval_rewards, is_own_data, main
from launch.evaluate import Sample, evaluate
from launch.evaluate_data import load_eval_set
from launch.recipe import RecipeError
from rewards.result import RewardConfigError

CUSTOM = '''
def score(prompt, response, reference, metadata, shout=False):
    """Correct when the response names the metadata's colour (the answer column says nothing about it)."""
    ok = metadata["colour"] in response.lower()
    return {"score": float(ok), "reason": "correct" if ok else "wrong", "chars": len(response)}
'''


def _stub(answers):
    def respond(evalset, n):
        return [[Sample(answers(item) if callable(answers) else answers[item.id], tokens=3, decoded=4, nfe=2)
                 for _ in range(n)] for item in evalset.items]
    return respond


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_random_text_is_not_a_toy_task_answer():
    evalset = load_eval_set("arithmetic", task_kwargs={"num_train": 10, "num_test": 4})
    summary, rows = evaluate(evalset, _stub(lambda item: f"Y=JGDP{item.reference}&UH<u"), n=1)
    assert summary["avg@1"] == 0.0 and summary["reasons"] == {"bad_format": 4}  # was 1.0: the first integer counted


def test_math_uses_the_math_reward_not_the_last_number(tmp_path):
    path = _jsonl(tmp_path / "math500.jsonl", [{"problem": "Half of 1?", "answer": "\\frac{1}{2}", "unique_id": "b"}])
    summary, rows = evaluate(load_eval_set(path, format="math500"), _stub(lambda item: "it is 0.5"), n=1)
    assert rows[0]["reasons"] == ["no_answer"]  # was correct: the last number of any text counted
    summary, rows = evaluate(load_eval_set(path, format="math500"), _stub(lambda item: "\\boxed{0.5} or \\boxed{2}"),
                             n=1)
    assert rows[0]["reasons"][0].startswith("conflicting")


def test_a_custom_reward_reading_a_column_scores_the_eval(tmp_path):
    (tmp_path / "colour.py").write_text(CUSTOM)
    path = _jsonl(tmp_path / "qa.jsonl", [
        {"prompt": "Sky?", "answer": "see metadata", "metadata": {"colour": "blue"}},
        {"prompt": "Grass?", "answer": "see metadata", "metadata": {"colour": "green"}}])
    evalset = load_eval_set(path)
    summary, rows = evaluate(evalset, _stub(lambda item: "It is BLUE."), n=1,
                             reward=[{"fn": "colour.py:score", "kwargs": {"shout": True}}], reward_base_dir=tmp_path)
    assert [r["reasons"] for r in rows] == [["correct"], ["wrong"]]
    assert summary["avg@1"] == 0.5
    with pytest.raises(RewardConfigError, match=r"reward\[0\].fn: 'score' takes 'metadata'"):
        no_meta = load_eval_set(_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Sky?", "answer": "blue"}]))
        evaluate(no_meta, _stub(lambda item: "blue"), n=1, reward=[{"fn": "colour.py:score"}],
                 reward_base_dir=tmp_path)


def test_which_rewards_eval_uses(tmp_path):
    trained = {"data": {"task": "arithmetic"}, "reward": [{"fn": "/abs/r.py:score", "weight": 0.5, "kwargs": {}}]}
    assert is_own_data(trained, "arithmetic") and not is_own_data(trained, "countdown")
    assert eval_rewards(trained, "auto", True) == [{"fn": "/abs/r.py:score", "weight": 0.5, "kwargs": {}}]
    assert eval_rewards(trained, "auto", False) is None
    assert eval_rewards(trained, "builtin", True) is None
    assert eval_rewards(trained, "recipe", False) == trained["reward"]
    with pytest.raises(RecipeError, match="--reward recipe: the checkpoint has no recipe"):
        eval_rewards(None, "recipe", False)
    data = tmp_path / "train.jsonl"
    data.write_text("")
    assert is_own_data({"data": {"train": str(data)}}, str(data)) and not is_own_data(None, str(data))


def test_cli_eval_of_a_run_uses_its_custom_reward(tmp_path, tiny_model_dirs):
    """`diffrl eval RUN_POLICY --data arithmetic` on a run that trained arithmetic with a custom reward: the
    custom reward scores the held-out split (its extra key and reason reach the per-item file)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dirs["block"], run / "policy")
    (tmp_path / "always.py").write_text(
        "def score(prompt, response, reference, task):\n"
        "    return {'score': 1.0, 'reason': 'correct', 'saw_task': float(task == 'arithmetic')}\n")
    recipe = {"seed": 0, "data": {"task": "arithmetic", "task_kwargs": {"num_train": 10, "num_test": 3}},
              "rollout": {"max_tokens": 8},
              "reward": [{"fn": str(tmp_path / "always.py") + ":score", "weight": 1.0, "kwargs": {}}]}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "eval"
    assert main(["eval", str(run / "policy"), "--data", "arithmetic", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())[0]
    assert summary["reward"] == [str(tmp_path / "always.py") + ":score"] and summary["avg@1"] == 1.0
    assert main(["eval", str(run / "policy"), "--data", "arithmetic", "--out", str(tmp_path / "b"), "-q",
                 "--reward", "builtin"]) == 0
    builtin = json.loads((tmp_path / "b" / "summary.json").read_text())[0]
    assert builtin["reward"] == "built-in" and builtin["avg@1"] == 0.0  # a random model is not right 3 times
