"""benchmarks/learning.py's tables: per-run and per-seed paired comparisons with the SFT start (flips, exact
McNemar p) from the per-item held-out scores, on synthetic results."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from launch.eval_stats import mcnemar_exact

REPO = Path(__file__).resolve().parents[2]


def _learning():
    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluation(items: dict) -> dict:
    acc = sum(items.values()) / len(items)
    return {"static": {"accuracy": acc, "tokens_per_forward": 1.0, "gen_wall_s": 0.1, "items": items},
            "dynamic": {"accuracy": acc, "tokens_per_forward": 2.0, "gen_wall_s": 0.1},
            "sampled": {"avg@4": acc, "pass@4": acc}}


def test_seed_table_reports_per_seed_flips_and_exact_p():
    bench = _learning()
    ids = [f"countdown/{i}" for i in range(40)]
    sft_items = {i: int(k < 10) for k, i in enumerate(ids)}  # 10 of 40 right
    # seed 0: fixes items 10..29 (20), breaks none; seed 1: fixes 10..12, breaks 0..4
    seed0 = {i: int(k < 30) for k, i in enumerate(ids)}
    seed1 = {i: int(5 <= k < 13) for k, i in enumerate(ids)}
    runs = {f"tracerl#s{s}": {"after": _evaluation(items), "steps": 10, "rl_seed": s, "wall_s": 60, "cpu_s": 60}
            for s, items in ((0, seed0), (1, seed1))}
    sft = {"block4": _evaluation(sft_items)}
    text = bench.seed_table(runs, sft)
    row = next(line for line in text.splitlines() if line.startswith("| tracerl "))
    assert f"s0: +50.0 (20 / 0, p = {mcnemar_exact(20, 0):.2g})" in row
    assert f"s1: -5.0 (3 / 5, p = {mcnemar_exact(3, 5):.2g})" in row
    assert row.rstrip().endswith("| 1/2 |")  # only seed 0 is significant at 0.01
    per_run = bench.table(runs, sft)
    assert "| 20 / 0, p = " in per_run and "| 3 / 5, p = " in per_run


def test_tables_without_per_item_scores_still_print():
    bench = _learning()
    old = _evaluation({"a": 1})
    del old["static"]["items"]
    runs = {"gdpo#s0": {"after": old, "steps": 1, "rl_seed": 0, "wall_s": 1, "cpu_s": 1}}
    row = next(line for line in bench.seed_table(runs, {"block4": old}).splitlines() if line.startswith("| gdpo"))
    assert row.rstrip().endswith("| s0: +0.0 | - |")


def test_every_benchmark_algorithm_builds_a_valid_recipe(tmp_path):
    """Each ALGOS row (online) and OFFLINE_ALGOS row (trainer.mode offline on a store) merges into a recipe the
    schema and the recipe rules accept, with the method's own algorithm and estimator and the common learner."""
    from launch.recipe_rules import problems

    bench = _learning()
    from benchmarks.learning_offline import OFFLINE_ALGOS, offline_recipe

    lr = {"learner": {"lr": 2e-5}}
    for name, sections in bench.ALGOS.items():
        recipe = bench.build_recipe(name, "countdown", tmp_path / "sft", tmp_path / name, 0, lr)
        assert recipe.algorithm.name == sections["algorithm"]["name"] and recipe.learner.lr == 2e-5, name
        assert recipe.estimator.name == sections["estimator"]["name"] and recipe.data.task_seed == 0, name
        assert problems(recipe) == [], name
    for name, sections in OFFLINE_ALGOS.items():
        recipe = offline_recipe(name, tmp_path / "sft", tmp_path / name, str(tmp_path / "store"), 1, 2.0, lr, name)
        assert recipe.trainer.mode == "offline" and recipe.trainer.budget.minutes == 2.0, name
        assert recipe.data.task is None and recipe.data.trajectories == str(tmp_path / "store"), name
        assert recipe.estimator.name == sections["estimator"]["name"] and recipe.learner.lr == 2e-5, name
        assert problems(recipe) == [], name
