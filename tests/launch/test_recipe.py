"""Recipe loading: extends chains, dotted overrides, filled-in defaults, round trips, paths, kinds."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest
import yaml

from launch.recipe import (
    Recipe,
    RecipeError,
    check_paths,
    load_recipe,
    recipe_from_dict,
    resolve_kind,
    save_recipe,
)

from rl.published import ALGORITHM_DEFAULTS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BASE = {
    "name": "t", "model": {"tiny": "qwen3-block"}, "algorithm": "tracerl", "reward": [{"fn": "math"}],
    "data": {"task": "arithmetic"}, "rollout": {"max_tokens": 16},
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _base(**sections) -> dict:
    data = {**BASE, **sections}
    return data


# ------------------------------------------------------------------------------------------------- extends
def test_extends_chain_merges_mappings_and_replaces_lists(tmp_path):
    _write(tmp_path / "bases/root.yaml", yaml.safe_dump({**BASE, "reward": [{"fn": "math"}, {"fn": "code"}],
                                                        "trainer": {"total_steps": 5, "log": ["jsonl", "wandb"]}}))
    _write(tmp_path / "bases/mid.yaml", """\
        extends: root.yaml
        rollout: {samples_per_prompt: 3}
        trainer: {log: [tensorboard]}
        """)
    leaf = _write(tmp_path / "leaf.yaml", """\
        extends: bases/mid.yaml
        name: leaf
        rollout: {temperature: 0.7}
        reward: [{fn: math, weight: 2}]
        """)
    recipe = load_recipe(leaf)
    assert recipe.name == "leaf"
    assert (recipe.rollout.max_tokens, recipe.rollout.samples_per_prompt, recipe.rollout.temperature) == (16, 3, 0.7)
    assert recipe.trainer.total_steps == 5 and recipe.trainer.log == ["tensorboard"]
    assert [(r.fn, r.weight) for r in recipe.reward] == [("math", 2.0)]


def test_extends_switching_algorithm_replaces_its_parameters(tmp_path):
    _write(tmp_path / "base.yaml", yaml.safe_dump({**BASE, "algorithm": {"name": "tracerl", "value_model": {}}}))
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\nmodel: {tiny: llada}\nalgorithm: {name: gdpo}\n")
    recipe = load_recipe(child)
    assert recipe.algorithm.name == "gdpo" and recipe.estimator.name == "sdmc"


def test_null_in_child_replaces_a_mapping(tmp_path):
    _write(tmp_path / "base.yaml", yaml.safe_dump({**BASE, "model": {"tiny": "llada"},
                                                  "rollout": {"max_tokens": 16, "eoser": {"gamma_min": 0.3}}}))
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\nrollout: {eoser: null}\n")
    assert load_recipe(tmp_path / "base.yaml").rollout.eoser.gamma_min == 0.3
    assert load_recipe(child).rollout.eoser is None


def test_shorthands_for_algorithm_estimator_and_a_single_reward(tmp_path):
    data = {**BASE, "algorithm": "diffu_grpo", "estimator": "coupled", "model": {"tiny": "llada"},
            "reward": {"fn": "my_pkg.rewards:score", "weight": 0.5}}
    recipe = load_recipe(_write(tmp_path / "r.yaml", yaml.safe_dump(data)))
    assert (recipe.algorithm.name, recipe.estimator.name) == ("diffu_grpo", "coupled")
    assert [(r.fn, r.weight) for r in recipe.reward] == [("my_pkg.rewards:score", 0.5)]
    assert recipe_from_dict({**data, "reward": "code"}).reward[0].fn == "code"


def test_name_defaults_to_file_stem(tmp_path):
    data = {k: v for k, v in BASE.items() if k != "name"}
    assert load_recipe(_write(tmp_path / "my-run.yaml", yaml.safe_dump(data))).name == "my-run"


# ----------------------------------------------------------------------------------------------- overrides
def test_overrides_dotted_keys_list_indices_and_yaml_values(tmp_path):
    path = _write(tmp_path / "r.yaml", yaml.safe_dump(BASE))
    recipe = load_recipe(path, [
        "rollout.block_size=8", "rollout.max_tokens=32", "reward.0.weight=2", "reward.1.fn=code",
        "learner.lr=1e-5", "trainer.log=[jsonl, wandb]", "reward.0.kwargs.scale=1e-3", "rollout.top_k=",
    ])
    assert recipe.rollout.block_size == 8 and recipe.rollout.max_tokens == 32
    assert [(r.fn, r.weight) for r in recipe.reward] == [("math", 2.0), ("code", 1.0)]
    assert recipe.learner.lr == 1e-5 and recipe.trainer.log == ["jsonl", "wandb"]
    assert recipe.reward[0].kwargs == {"scale": 1e-3}  # YAML 1.2 float, not the string "1e-3"
    assert recipe.rollout.top_k is None


def test_override_switching_algorithm_drops_old_parameters(tmp_path):
    path = _write(tmp_path / "r.yaml", yaml.safe_dump({**BASE, "algorithm": {"name": "tracerl", "beta": 0.2}}))
    recipe = load_recipe(path, ["algorithm.name=wd1", "estimator.name=one_step"])
    assert recipe.algorithm.name == "wd1" and recipe.estimator.name == "one_step"
    assert load_recipe(path, ["algorithm=spg", "model.tiny=llada"]).estimator.name == "block_random"  # SPG's masks


def test_unknown_override_key_fails_like_a_recipe_key(tmp_path):
    path = _write(tmp_path / "r.yaml", yaml.safe_dump(BASE))
    with pytest.raises(RecipeError, match=r"r\.yaml: learner\.micro_batch: unknown key "
                                          r"\(did you mean 'micro_batch_size'\?\)$"):
        load_recipe(path, ["learner.micro_batch=4"])


# ------------------------------------------------------------------------------------------------ defaults
def test_each_algorithm_gets_its_default_estimator_and_published_values():
    recipe = recipe_from_dict(_base(model={"tiny": "llada"}, algorithm="diffu_grpo"))
    assert recipe.estimator.name == "one_step" and recipe.estimator.p_mask == 0.15
    assert (recipe.algorithm.clip_eps_low, recipe.algorithm.beta, recipe.algorithm.kl_estimator) == (0.5, 0.04, "k3")
    assert (recipe.learner.lr, recipe.learner.betas, recipe.learner.mu, recipe.learner.grad_clip) == \
        (3e-6, (0.9, 0.99), 12, 0.2)
    assert (recipe.rollout.samples_per_prompt, recipe.rollout.temperature) == (6, 0.9)
    assert recipe.learner.reference_model is True  # beta 0.04 against the reference
    assert recipe.rollout.block_size == 16  # LLaDA's semi-AR block 32, at most the response
    gdpo = recipe_from_dict(_base(model={"tiny": "llada"}, algorithm="gdpo"))
    assert (gdpo.estimator.name, gdpo.estimator.quadrature, gdpo.algorithm.beta) == ("sdmc", "gauss-3", 0.0)
    assert (gdpo.learner.lr, gdpo.learner.reference_model) == (3e-7, False)
    tracerl = recipe_from_dict(_base())
    algo = tracerl.algorithm
    assert (algo.clip_eps_low, algo.beta, algo.kl_reference, algo.ratio_clamp, algo.advantage) == \
        (0.2, 0.01, "old", 10.0, "zscore")
    assert (algo.filter.accuracy_lo, algo.filter.accuracy_hi) == (0.2, 0.8)
    assert (tracerl.estimator.shrink, tracerl.learner.grad_accum, tracerl.rollout.samples_per_prompt) == (1, 32, 16)
    assert tracerl.output_dir == "runs/t" and tracerl.model.tiny_vocab == "small" and tracerl.model.kind == "block"


def test_explicit_values_beat_published_ones():
    recipe = recipe_from_dict(_base(algorithm={"name": "tracerl", "filter": {"accuracy_hi": 0.9}},
                                    learner={"lr": 2e-6}, rollout={"max_tokens": 16, "samples_per_prompt": 4}))
    assert (recipe.learner.lr, recipe.rollout.samples_per_prompt) == (2e-6, 4)
    assert (recipe.algorithm.filter.accuracy_lo, recipe.algorithm.filter.accuracy_hi) == (0.2, 0.9)


def test_estimator_parameters_without_name_go_to_the_default_estimator():
    recipe = recipe_from_dict(_base(model={"tiny": "llada"}, algorithm="diffu_grpo", estimator={"p_mask": 0.3}))
    assert (recipe.estimator.name, recipe.estimator.p_mask) == ("one_step", 0.3)


def test_eoser_and_trajectory_defaults_follow_the_schedule_and_kind():
    linear = recipe_from_dict(_base(model={"tiny": "llada"}, algorithm="cj_grpo",
                                    rollout={"max_tokens": 16, "eoser": {}}))
    assert (linear.rollout.eoser.schedule, linear.rollout.eoser.gamma_min, linear.estimator.shrink) == \
        ("linear", 0.4, 8)
    ass = recipe_from_dict(_base(model={"tiny": "llada"}, algorithm="cj_grpo",
                                 rollout={"max_tokens": 16, "ass": True, "eoser": {}}))
    assert (ass.rollout.eoser.schedule, ass.rollout.eoser.gamma_min, ass.rollout.block_size) == ("ass", 0.01, 16)


def test_published_defaults_name_real_fields():
    fields = {"learner": Recipe.model_fields["learner"].annotation.model_fields,
              "rollout": Recipe.model_fields["rollout"].annotation.model_fields}
    for entry in ALGORITHM_DEFAULTS.values():
        for section in ("learner", "rollout"):
            assert set(getattr(entry, section)) <= set(fields[section])


@pytest.mark.parametrize("algorithm", ["diffu_grpo", "gdpo", "cj_grpo", "tracerl", "coupled_grpo", "wd1", "spg",
                                       "random_mask_grpo"])
def test_loss_params_are_loss_config_fields(algorithm):
    from dataclasses import fields

    from rl.algorithms.core import LossConfig

    recipe = recipe_from_dict(_base(model={"tiny": "llada"}, algorithm=algorithm))
    assert set(recipe.algorithm.loss_params()) <= {f.name for f in fields(LossConfig)}


def test_recipe_is_frozen():
    recipe = recipe_from_dict(_base())
    with pytest.raises(pydantic.ValidationError):
        recipe.rollout.max_tokens = 8


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_round_trip(tmp_path, name):
    recipe = load_recipe(RECIPES / name)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == recipe
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["recipe.yaml"]  # no temp file left behind


# --------------------------------------------------------------------------------------------- paths, kinds
def test_check_paths_names_the_missing_field(tmp_path):
    recipe = load_recipe(RECIPES / "tracerl-trado-math.yaml")
    with pytest.raises(RecipeError, match=r"model\.path: /path/to/TraDo-8B-Instruct: no such directory "
                                          r"\(and 2 more\)$"):
        check_paths(recipe)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    ok = recipe_from_dict(_base(model={"path": "ckpt", "kind": "sdar"},
                                data={"train": "train.jsonl"}, reward=[{"fn": "rewards/mine.py:score"}]))
    with pytest.raises(RecipeError, match=r"reward\.0\.fn: rewards/mine\.py: no such file$"):
        check_paths(ok, base_dir=tmp_path)
    _write(tmp_path / "rewards/mine.py", "def score(*a): return 0.0\n")
    check_paths(ok, base_dir=tmp_path)


def test_resolve_kind_fills_and_checks_kind_dependent_values():
    auto = recipe_from_dict(_base(model={"path": "/ckpt"}, rollout={"max_tokens": 64, "eoser": {}},
                                  algorithm="cj_grpo"))
    assert auto.model.kind == "auto" and auto.estimator.shrink is None and auto.rollout.block_size is None
    llada = resolve_kind(auto, "llada", 32)
    assert (llada.model.kind, llada.rollout.block_size, llada.estimator.shrink) == ("llada", 32, 8)
    with pytest.raises(RecipeError, match=r"rollout\.eoser: EOS early rejection needs a full-attention model"):
        resolve_kind(auto, "sdar", 4)
    with pytest.raises(RecipeError, match=r"model\.kind: recipe says 'llada' but the checkpoint is 'sdar'"):
        resolve_kind(llada, "sdar")
    assert resolve_kind(llada, "llada") is llada
    short = recipe_from_dict(_base(model={"path": "/ckpt"}, algorithm="gdpo"))
    assert resolve_kind(short, "llada", 32).rollout.block_size == 16  # the semi-AR block, at most the response


def test_importing_the_recipe_layer_stays_light():
    code = ("import sys, launch.recipe; heavy = [m for m in ('torch', 'ray', 'transformers', 'deepspeed') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reward_workers_is_a_setting_capped_by_the_free_cpus():
    from launch.driver_roles import reward_workers
    from launch.recipe import ResourcesSection

    assert ResourcesSection().reward_workers == 2  # the former hard-coded cap is the default
    assert reward_workers(16, 2) == (2, 1.0) and reward_workers(16, 6) == (6, 1.0)
    assert reward_workers(3.5, 6) == (3, 1.0)  # one CPU each, never more workers than free CPUs
    assert reward_workers(0.5, 6) == (1, 0.0)  # no CPU left outside the placement group: one zero-CPU worker
    with pytest.raises(ValueError, match="resources.reward_workers"):
        reward_workers(4, 0)
