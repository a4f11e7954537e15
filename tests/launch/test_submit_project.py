"""`diffrl submit` from a user's own project (no Ray cluster needed: the job's description is checked)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from launch.submit import SubmitError, build_job, outside_project

REPO = Path(__file__).resolve().parents[2]


def test_a_project_outside_the_checkout_is_the_working_dir_and_diffrl_travels_as_py_modules(tmp_path):
    project = tmp_path / "proj"
    (project / "conf").mkdir(parents=True)
    (project / "conf" / "r.yaml").write_text("{}")
    entrypoint, env = build_job(project / "conf" / "r.yaml", ["data.train=d x.jsonl"], project)
    assert env["working_dir"] == str(project.resolve())
    assert shlex.split(entrypoint) == ["python", "-m", "launch.cli", "train", "conf/r.yaml", "data.train=d x.jsonl"]
    modules = [Path(p) for p in env["py_modules"]]
    assert [p.name for p in modules] == ["launch", "rl", "rollout", "rewards"]
    assert all((p / "__init__.py").is_file() for p in modules)


def test_the_checkout_itself_needs_no_py_modules():
    _, env = build_job(REPO / "recipes" / "tiny-tracerl.yaml", [], REPO)
    assert env["working_dir"] == str(REPO) and "py_modules" not in env


def test_a_recipe_outside_the_project_is_one_line(tmp_path):
    (tmp_path / "proj").mkdir()
    with pytest.raises(SubmitError) as err:
        build_job(REPO / "recipes" / "tiny-tracerl.yaml", [], tmp_path / "proj")
    assert "must be inside the project" in str(err.value) and "--working-dir" in str(err.value)
    with pytest.raises(SubmitError, match="--working-dir .*: no such directory"):
        build_job(REPO / "recipes" / "tiny-tracerl.yaml", [], tmp_path / "nope")


def test_inputs_outside_the_project_are_named(tmp_path):
    from launch.recipe import load_recipe

    (tmp_path / "p").mkdir()
    recipe = load_recipe(REPO / "recipes" / "tiny-tracerl.yaml",
                         ["data.task=null", f"data.train={tmp_path / 'p' / 'in.jsonl'}",
                          "data.eval=/elsewhere/e.jsonl"])
    assert outside_project(recipe, (tmp_path / "p").resolve()) == ["data.eval /elsewhere/e.jsonl"]
