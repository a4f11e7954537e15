"""README's worked custom-task example: reasoning-gym's generator writes the rows, the example recipe reads them
with relative paths (its own folder), and the reward scores a row through reasoning-gym's scorer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launch.data import load_prompts, reward_item
from launch.preflight import check_run_inputs
from launch.recipe import check_paths, load_recipe
from rewards.specs import validate_reward_specs

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "reasoning_gym_task"


@pytest.mark.slow  # ~25 s: importing reasoning-gym
def test_reasoning_gym_rows_train_with_the_example_recipe(tmp_path, monkeypatch):
    # The example copied into a user's project (so the test writes nothing into the checkout).
    project = tmp_path / "project"
    shutil.copytree(REPO / "examples", project / "examples", ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(REPO / "recipes", project / "recipes")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", project / "examples/reasoning_gym_task/make_data.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.main(["--train", "4", "--test", "2"])
    monkeypatch.chdir(tmp_path)  # not the project: paths in the recipe are relative to its own folder
    recipe = load_recipe(project / "examples" / "reasoning_gym_task" / "recipe.yaml")
    here = project / "examples" / "reasoning_gym_task"
    assert recipe.data.train == str(here / "data" / "train.jsonl")
    assert recipe.reward[0].fn == f"{project / 'examples' / 'rewards' / 'reasoning_gym_reward.py'}:score"
    check_paths(recipe)
    check_run_inputs(recipe)

    from rollout.models.tiny import small_tokenizer

    prompts = load_prompts(recipe.data, small_tokenizer(), seed=0)
    first = json.loads((here / "data" / "train.jsonl").read_text().splitlines()[0])
    assert len(prompts) == 4 and prompts[0].text == first["question"]
    assert prompts[0].meta["metadata"] == first["metadata"]
    specs = [s.model_dump() for s in recipe.reward]
    right = reward_item(prompts[0], f"<answer>{first['answer']}</answer>", 3, prompt_field="question")
    validate_reward_specs(specs, right)
    from rewards.scorer import Scorer

    scorer = Scorer(specs, sample_row=right)
    wrong = reward_item(prompts[0], "<answer>not a number</answer>", 3, prompt_field="question")
    results = scorer.score([right, wrong])
    assert [r["reason"] for r in results] == ["correct", "wrong"]
