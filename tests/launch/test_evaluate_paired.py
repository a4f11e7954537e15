"""`diffrl eval CKPT --baseline OTHER`: two tiny checkpoints on the same items and seeds; the paired table and the
per-item rows agree with two independent evaluations, the p-value with McNemar on those, and different item sets
are a one-line error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launch.cli import main
from launch.eval_stats import mcnemar_exact

# A reward that separates two random models: "correct" when the response has an even number of characters.
REWARD = '''
def score(prompt, response, reference):
    ok = len(response) % 2 == 0
    return {"score": float(ok), "reason": "correct" if ok else "wrong", "metrics": {}}
'''


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_dirs, tmp_path_factory):
    """The tiny block model and a copy with perturbed weights (another model, same tokenizer)."""
    import torch

    from rollout.models.loading import load_policy, save_policy

    root = tmp_path_factory.mktemp("paired")
    base = root / "base"
    shutil.copytree(tiny_model_dirs["block"], base)
    policy = load_policy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.5 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=generator))
    save_policy(policy, root / "new")
    (root / "reward.py").write_text(REWARD)
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_paired_eval_matches_two_independent_evaluations(two_checkpoints, tmp_path, capsys):
    from launch.evaluate import EvalRun, run_eval
    from launch.evaluate_paired import run_paired_eval

    root = two_checkpoints
    common = dict(data=["arithmetic"], limit=24, max_tokens=4, rollout={"temperature": 1.0, "batch_size": 24},
                  reward=[{"fn": "reward.py:score"}], reward_base_dir=str(root), seed=3, print_table=False)
    singles = {}
    for role in ("base", "new"):
        run_eval(str(root / role), EvalRun(out=str(tmp_path / role), **common), progress=False)
        singles[role] = {r["id"]: r["num_correct"] for r in _rows(tmp_path / role / "arithmetic.jsonl")}
    records = run_paired_eval(str(root / "new"), str(root / "base"), EvalRun(out=str(tmp_path / "paired"), **common),
                              progress=False, resamples=500)
    (record,) = records
    c = record["comparison"]
    fixed = sum(singles["new"][i] > singles["base"][i] for i in singles["new"])
    broken = sum(singles["new"][i] < singles["base"][i] for i in singles["new"])
    assert fixed + broken > 0, "the two checkpoints should disagree somewhere for this test to mean anything"
    assert (c["items"], c["fixed"], c["broken"]) == (24, fixed, broken)
    assert c["before"] == pytest.approx(sum(singles["base"].values()) / 24)
    assert c["after"] == pytest.approx(sum(singles["new"].values()) / 24)
    assert c["p_value"] == mcnemar_exact(fixed, broken) and c["test"] == "mcnemar_exact"
    assert c["ci_low"] <= c["diff"] <= c["ci_high"]
    rows = _rows(tmp_path / "paired" / "arithmetic.paired.jsonl")
    assert [r["change"] for r in rows].count("fixed") == fixed and len(rows) == 24
    assert {r["id"]: r["after"] for r in rows} == {i: float(v) for i, v in singles["new"].items()}
    assert json.loads((tmp_path / "paired" / "paired.json").read_text())[0]["comparison"] == c


def test_cli_paired_eval_prints_the_table(two_checkpoints, tmp_path, capsys):
    root = two_checkpoints
    out = tmp_path / "out"
    assert main(["eval", str(root / "new"), "--baseline", str(root / "base"), "--data", "arithmetic", "--limit", "8",
                 "--max-tokens", "4", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "baseline %" in text and "fixed" in text and "exact two-sided McNemar" in text
    record = json.loads((out / "paired.json").read_text())[0]
    assert record["comparison"]["items"] == 8 and record["baseline"].endswith("base")


def test_cli_refuses_different_item_sets(two_checkpoints, tmp_path, capsys):
    """The baseline's sft.json records other task parameters: its arithmetic test split is another item set."""
    root = two_checkpoints
    other = tmp_path / "other"
    shutil.copytree(root / "base", other)
    (other / "sft.json").write_text(json.dumps({"data": {"task": "arithmetic", "task_kwargs": {"digits": 3},
                                                         "task_seed": 1}}))
    code = main(["eval", str(root / "new"), "--baseline", str(other), "--data", "arithmetic", "--limit", "4",
                 "--max-tokens", "4", "-q", "--overlap", "allow"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffrl: error: --data arithmetic: ")
    assert "evaluated on different items" in err[0]


def test_cli_paired_eval_of_a_run_against_its_start(two_checkpoints, tmp_path, capsys):
    """`diffrl eval RUN --baseline START`: the run's recipe gives the task split (its held-out items, checked
    against its training problems) and the reward; the table and paired.json come out."""
    from launch.recipe import load_recipe
    from rl.checkpoint import capture_rng, save_checkpoint
    from rollout.models.loading import load_policy, save_policy

    root = two_checkpoints
    run = tmp_path / "run"
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny-tracerl.yaml",
                         [f"output_dir={run}", "data.task_kwargs.num_train=300", "data.task_kwargs.num_test=20"])
    policy = load_policy(root / "new")
    save_checkpoint(run / "checkpoints", 2, writers={"policy": lambda d: save_policy(policy, d)},
                    state={"version": 2, "data": {"position": 8}, "store": {"files": [], "rows": 0}},
                    rng=capture_rng(), recipe_yaml=recipe.to_yaml())
    out = tmp_path / "out"
    assert main(["eval", str(run), "--baseline", str(root / "base"), "--data", "arithmetic", "--max-tokens", "4",
                 "--out", str(out), "-q"]) == 0
    record = json.loads((out / "paired.json").read_text())[0]
    assert record["comparison"]["items"] == 20 and record["summary"]["reward"] == ["arithmetic"]
    assert "exact two-sided McNemar" in capsys.readouterr().out
