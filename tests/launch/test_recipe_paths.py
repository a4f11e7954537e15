"""The one rule for relative paths in recipes, and model.path replacing an inherited tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
BASE = (REPO / "recipes" / "tiny-tracerl.yaml").resolve()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_paths_in_a_recipe_file_are_relative_to_its_folder_overrides_to_the_working_dir(tmp_path, monkeypatch):
    project = tmp_path / "project"
    recipe = _write(project / "conf" / "task.yaml", f"""extends: {BASE}
model: {{path: ../ckpt/policy}}
data: {{train: data/train.jsonl, eval: ../data/test.jsonl, task: null}}
output_dir: ../runs/mine
reward:
  - fn: my_rewards.py:score
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part for paths written in the file
    r = load_recipe(recipe)
    assert r.model.path == str(project / "ckpt" / "policy") and r.model.tiny is None and r.model.tiny_vocab is None
    assert r.data.train == str(project / "conf" / "data" / "train.jsonl")
    assert r.data.eval == str(project / "data" / "test.jsonl")
    assert r.output_dir == "../runs/mine"  # where the run goes: from the working directory, like runs/NAME
    assert r.reward[0].fn == f"{project / 'conf' / 'my_rewards.py'}:score"
    # Overrides: from the working directory.
    r = load_recipe(recipe, ["data.eval=held/out.jsonl", "reward.0.fn=other.py:f"])
    assert r.data.eval == str(elsewhere / "held" / "out.jsonl")
    assert r.reward[0].fn == f"{elsewhere / 'other.py'}:f"
    r = load_recipe(recipe, ["reward=[{fn: o.py:g}, {fn: math}]", "model={path: m}"])  # whole sections too
    assert [s.fn for s in r.reward] == [f"{elsewhere / 'o.py'}:g", "math"] and r.model.path == str(elsewhere / "m")
    assert r.data.train == str(project / "conf" / "data" / "train.jsonl")  # untouched by the overrides


def test_each_file_of_an_extends_chain_resolves_against_its_own_folder(tmp_path, monkeypatch):
    _write(tmp_path / "base" / "parent.yaml", f"extends: {BASE}\ndata: {{train: p.jsonl, task: null}}\n")
    child = _write(tmp_path / "child" / "c.yaml", "extends: ../base/parent.yaml\ndata: {eval: e.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(child)
    assert r.data.train == str(tmp_path / "base" / "p.jsonl")
    assert r.data.eval == str(tmp_path / "child" / "e.jsonl")


def test_absolute_paths_and_registered_rewards_are_kept(tmp_path):
    r = load_recipe(BASE, ["model.path=/abs/ckpt", "data.train=/abs/t.jsonl", "data.task=null"])
    assert (r.model.path, r.data.train) == ("/abs/ckpt", "/abs/t.jsonl")
    assert [s.fn for s in r.reward] == [s.fn for s in load_recipe(BASE).reward]  # built-in names stay names


def test_model_path_replaces_an_inherited_tiny_model(tmp_path):
    r = load_recipe(BASE, ["model.path=/ckpt"])  # before: also model.tiny=null model.tiny_vocab=null
    assert (r.model.path, r.model.tiny, r.model.tiny_vocab) == ("/ckpt", None, None)
    child = _write(tmp_path / "c.yaml", f"extends: {BASE}\nmodel: {{path: /ckpt}}\n")
    assert load_recipe(child).model.tiny is None
    back = load_recipe(child, ["model.tiny=sdar"])  # and the other way round
    assert (back.model.path, back.model.tiny) == (None, "sdar")


def test_both_sources_in_one_file_fail_with_one_line_saying_what_to_do(tmp_path):
    both = _write(tmp_path / "b.yaml", f"extends: {BASE}\nmodel: {{path: /ckpt, tiny: sdar}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(both)
    message = str(err.value)
    assert "\n" not in message and "model.path: set exactly one of model.path" in message
    assert "replaces an inherited model.tiny" in message
