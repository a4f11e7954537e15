"""Held-out sets disjoint from training, checked: generated tasks' splits by construction, data files by the
normalised-prompt check in the driver (data.eval_overlap) and in `diffrl eval` (--overlap)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from launch.eval_stats import normalise_prompt
from launch.heldout import HeldoutOverlapError, check_heldout, task_train_prompts
from rl.tasks import TASKS, make_task

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny-tracerl.yaml")
# The benchmark's task settings (benchmarks/learning.py SETUPS) and the recipes' defaults.
SETTINGS = [("countdown", {"num_train": 5000, "num_test": 200}), ("arithmetic", {"digits": 2, "num_train": 2000}),
            ("arithmetic", {}), ("sudoku", {"num_train": 500, "num_test": 100})]


@pytest.mark.parametrize("name,kwargs", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_generated_test_splits_share_no_prompt_with_training(name, kwargs, seed):
    task = make_task(name, seed=seed, **kwargs)
    train = {normalise_prompt(r["prompt"]) for r in task.rows("train")}
    test = [normalise_prompt(r["prompt"]) for r in task.rows("test")]
    assert len(set(test)) == len(test) and not train & set(test)
    # what the driver trains on / evaluates (launch.data reads tasks through Task.items)
    assert [p for p, _, _ in task.items("eval")] == [r["prompt"] for r in task.rows("test")]
    sources = [("train", [r["prompt"] for r in task.rows("train")], TASKS[name].prompt_key)]
    assert check_heldout([r["prompt"] for r in task.rows("test")], sources, overlap="refuse",
                         where="t") == list(range(len(test)))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_test_split_is_independent_of_the_training_size(name):
    """By construction: the test split is the first num_test distinct problems of the seeded stream, training the
    next ones; an SFT run and an RL run asking for different num_train still share one held-out split."""
    small = make_task(name, seed=5, num_train=40, num_test=30)
    large = make_task(name, seed=5, num_train=400, num_test=30)
    assert small.rows("test") == large.rows("test")
    assert not {r["prompt"] for r in large.rows("train")} & {r["prompt"] for r in small.rows("test")}


def test_a_larger_test_split_than_trained_with_is_caught():
    """A held-out split asked with more items than the SFT run held out reaches into the SFT run's training
    problems: the check refuses it (the generator's disjointness holds only for equal num_test)."""
    trained = task_train_prompts("arithmetic", {"num_test": 100, "num_train": 500}, 0)
    wider = [r["prompt"] for r in make_task("arithmetic", seed=0, num_test=150, num_train=10).rows("test")]
    with pytest.raises(HeldoutOverlapError, match="50 of 150 evaluation prompts are also in SFT"):
        check_heldout(wider, [("SFT", trained, None)], overlap="refuse", where="--data arithmetic")
    assert check_heldout(wider, [("SFT", trained, None)], overlap="drop", where="x") == list(range(100))
    assert check_heldout(wider, [("SFT", trained, None)], overlap="allow", where="x") == list(range(150))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompt_key_is_the_generators_problem_key(name):
    from rl.tasks.base import task_rng

    task = make_task(name, seed=0, **({"digits": 3, "ops": "+-*"} if name == "arithmetic" else {}))
    rng = task_rng(0, task.tag)
    for _ in range(200):
        key, row = task.draw(rng)
        assert TASKS[name].prompt_key(row["prompt"]) == key
    assert TASKS[name].prompt_key("What is 2+2?") is None


def test_training_on_another_generator_seed_is_caught_by_problem():
    """An RL run generating countdown with its own seed (1) while its SFT start and the held-out split use seed 0:
    95 of the 200 held-out problems are training problems of seed 1, 19 of them with the very same prompt text."""
    from launch.heldout import _data_sources

    kw = {"num_train": 5000, "num_test": 200}
    held = [r["prompt"] for r in make_task("countdown", seed=0, **kw).rows("test")]
    (source,) = _data_sources({"task": "countdown", "task_kwargs": kw}, 1, "the run's")
    with pytest.raises(HeldoutOverlapError, match=r"95 of 200 evaluation prompts are also in the run's data.task "
                                                  r"'countdown' \(seed 1\)"):
        check_heldout(held, [source], overlap="refuse", where="--data countdown")
    assert len(check_heldout(held, [source[:2] + (None,)], overlap="drop", where="x")) == 200 - 19
    # data.task_seed pins the generator: the same split for every RL seed
    (pinned,) = _data_sources({"task": "countdown", "task_kwargs": kw, "task_seed": 0}, 1, "the run's")
    assert check_heldout(held, [pinned], overlap="refuse", where="x") == list(range(200))


def test_data_task_seed_decouples_the_split_from_the_run_seed():
    from launch.data import load_prompts
    from launch.recipe import load_recipe

    class Chars:  # a tokenizer stand-in: one id per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    def train_texts(*overrides):
        recipe = load_recipe(RECIPE, ["data.chat_template=false", *overrides])
        return [p.text for p in load_prompts(recipe.data, Chars(), split="train", seed=recipe.seed)]

    assert train_texts("seed=1") != train_texts("seed=0")
    assert train_texts("seed=1", "data.task_seed=0") == train_texts("seed=0")


def test_benchmark_pins_the_task_seed_to_the_sft_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "benchmarks" / "learning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = bench.build_recipe("tracerl", "countdown", REPO, Path("/tmp/x"), 2, {}, run_name="tracerl#s2", data_seed=0)
    assert recipe.seed == 2 and recipe.data.task_seed == 0


def test_overlap_is_found_after_normalisation():
    with pytest.raises(HeldoutOverlapError, match=r"1 of 3 evaluation prompts .* item 2"):
        check_heldout(["a", "b", "What is 2+2?"], [("data.train", ["what is  2+2?\n"], None)], overlap="refuse",
                      where="data.eval")
    with pytest.raises(HeldoutOverlapError, match="nothing left"):
        check_heldout(["a"], [("data.train", ["A"], None)], overlap="drop", where="data.eval")


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("diffrl: error: "), err
    return err[-1]


def test_driver_refuses_an_eval_file_overlapping_training(tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", ["1+1=", "2+2=", "3+3="])
    held = _jsonl(tmp_path / "held.jsonl", ["4+4=", "2+2= ", "5+5="])  # equal once normalised
    code = main(["train", RECIPE, f"output_dir={tmp_path / 'run'}", "-q", "data.task=null", "data.task_kwargs={}",
                 f"data.train={train}", f"data.eval={held}", "trainer.eval_every=1"])
    assert code == 2
    line = _error(capsys)
    assert "1 of 3 evaluation prompts are also in data.train" in line and "'2+2= '" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_driver_drops_overlapping_eval_items_when_asked(tmp_path):
    from launch.driver_setup import prepare_run
    from launch.recipe import load_recipe

    train = _jsonl(tmp_path / "train.jsonl", ["1+1=", "2+2=", "3+3="])
    held = _jsonl(tmp_path / "held.jsonl", ["4+4=", "2+2=", "5+5="])
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", "data.task=null", "data.task_kwargs={}",
                                  f"data.train={train}", f"data.eval={held}", "trainer.eval_every=1",
                                  "data.eval_overlap=drop"])
    ctx = prepare_run(recipe)
    try:
        assert [p.text for p in ctx.eval_prompts] == ["4+4=", "5+5="]
    finally:
        ctx.release()


def test_eval_refuses_items_of_the_checkpoints_sft_data(tmp_path, capsys, tiny_model_dirs):
    import shutil

    ckpt = tmp_path / "sft"
    shutil.copytree(tiny_model_dirs["block"], ckpt)
    train = _jsonl(tmp_path / "train.jsonl", ["1+1=", "2+2="])
    (ckpt / "sft.json").write_text(json.dumps({"data": {"task": None, "file": str(train)}}))
    held = _jsonl(tmp_path / "held.jsonl", ["4+4=", "2+2="])
    assert main(["eval", str(ckpt), "--data", str(held), "-q"]) == 2
    assert f"--data {held}: 1 of 2 evaluation prompts are also in SFT" in _error(capsys)
    out = tmp_path / "out"
    assert main(["eval", str(ckpt), "--data", str(held), "-q", "--overlap", "drop", "--max-tokens", "4",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "held.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["4+4="]


def test_driver_checks_the_held_out_split_against_the_starting_models_sft_data(tmp_path, tiny_model_dirs):
    """RL from an SFT checkpoint whose task split used another generator seed: its held-out problems were SFT
    training problems; the run is refused before it starts."""
    import shutil

    from launch.driver_setup import prepare_run
    from launch.recipe import load_recipe

    sft = tmp_path / "sft"
    shutil.copytree(tiny_model_dirs["block"], sft)
    (sft / "sft.json").write_text(json.dumps({"data": {"task": "arithmetic", "task_kwargs": {"num_train": 1500},
                                                       "task_seed": 1}}))
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", "model.tiny=null", "model.tiny_vocab=null",
                                  f"model.path={sft}", "model.kind=block", "trainer.eval_every=1"])
    with pytest.raises(HeldoutOverlapError, match=r"data.task 'arithmetic' test split: \d+ of 200 evaluation prompts "
                                                  r"are also in SFT .*sft.json\) data.task 'arithmetic' \(seed 1\)"):
        prepare_run(recipe)
    assert not (tmp_path / "run").exists()
