"""End to end: a custom reward that needs the data row's `metadata` column runs through `diffrl train` (local Ray, tiny
recipe, 2 steps); its extra keys reach metrics.jsonl and TensorBoard; items whose reward raised are counted as
`reward/errors` on every step (metrics, step line, `diffrl status`), matching the reasons stored per trajectory.
"""
from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

REWARD_FILE = '''
def score(prompt, response, reference, metadata):
    """Fraction of the response's characters in the row's metadata alphabet (a graded signal for a random model)."""
    alphabet = set(metadata["alphabet"])
    hits = sum(c in alphabet for c in response)
    return {"score": hits / max(1, len(response)), "reason": "ok", "hits": hits, "alphabet_size": len(alphabet)}


def flaky(prompt, response, reference, row):
    """Raises on the rows the data marks: those items must score 0 with an error reason, and be counted."""
    if row["metadata"]["flaky"]:
        raise ValueError("this row breaks the reward")
    return 1.0
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("row_reward")
    rows = [{"question": f"{a}+{a}=", "answer": str(2 * a),
             "metadata": {"alphabet": "0123456789"[: 3 + a], "flaky": a % 2 == 1}} for a in range(8)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "row_reward.py").write_text(REWARD_FILE)
    (root / "recipe.yaml").write_text(textwrap.dedent(f"""\
        extends: {cli.REPO / "recipes" / "tiny-tracerl.yaml"}
        name: row-reward
        data:
          task: null
          train: {root / "rows.jsonl"}
          prompt_field: question
          answer_field: answer
        reward:
          - fn: row_reward.py:score
          - fn: row_reward.py:flaky
            weight: 0.0
        trainer:
          total_steps: 2
          checkpoint_every: 2
          log: [jsonl, tensorboard]
        """))
    out = root / "out"
    done = cli.run_cli("train", str(root / "recipe.yaml"), f"output_dir={out}", cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_metadata_reward_extra_keys_reach_metrics_jsonl(run):
    out, _ = run
    rows = cli.metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/row_reward/score"] <= 1.0
        assert r["reward/row_reward/hits"] >= 0
        assert 3 <= r["reward/row_reward/alphabet_size"] <= 10  # metadata, averaged over the step's items
        assert r["reward/flaky/score"] == pytest.approx(1.0 - r["reward/errors"] / 16)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_errors_are_counted_per_step_as_stored(run):
    out, done = run
    from rl.store import read_store

    ds = read_store(out / "store")
    for r in cli.metrics(out):
        stored = [reason for step, reason in zip(ds["step"], ds["reason"]) if step == r["step"]]
        errors = sum(reason.startswith("error: flaky: ValueError: this row breaks the reward") for reason in stored)
        assert r["reward/errors"] == errors
    # 2 steps x 4 prompts = one epoch of the 8 rows: the 4 flaky rows x 4 samples each
    assert sum(r["reward/errors"] for r in cli.metrics(out)) == 16
    assert "rew_err" in done.stdout or "rew_err" in done.stderr
    status = cli.run_cli("status", str(out.parent), cwd=out.parent, timeout=60)
    last = cli.metrics(out)[-1]
    assert f"rew_err {last['reward/errors']}" in status.stdout
