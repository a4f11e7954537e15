"""End to end, a LoRA run (tiny recipe, run_training in process on the module's local Ray at 127.0.0.1): the rollout
workers get only the adapters (LoRA-delta weight sync, merged onto their copy of the initial policy), and a run stopped
after step 1 and resumed (`diffrl resume`, in process) continues exactly like an uninterrupted one: same samples,
rewards, losses and merged weights at steps 2-3. The resumed learner is rebuilt on the initial policy with the
checkpoint's adapters and optimizer state."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

RECIPE = cli.REPO / "recipes" / "tiny-tracerl.yaml"
# A digit-format reward gives a random-init model a dense signal; lr 1e-3 so that r-4 adapters visibly move.
OVERRIDES = ["model.lora={r: 4, alpha: 8}", "learner.lr=1e-3", "trainer.checkpoint_every=1", "trainer.keep_last=10",
             "data.task_kwargs.num_train=8", "reward.1.fn=format", r"reward.1.kwargs.pattern=\d"]


def test_lora_run_syncs_adapters_and_resumes_exactly(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.train_in_process(RECIPE, f"output_dir={tmp_path / 'A'}", "trainer.total_steps=3", *OVERRIDES).steps == 3
    assert cli.train_in_process(RECIPE, f"output_dir={tmp_path / 'B'}", "trainer.total_steps=1", *OVERRIDES).steps == 1
    assert cli.resume_in_process(tmp_path / "B", "trainer.total_steps=3").steps == 3

    a, b = cli.metrics(tmp_path / "A"), cli.metrics(tmp_path / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert any(r["learner/loss"] != 0 for r in a)  # the adapters trained
    # only the adapters travelled to the rollout worker (a full sync is the whole model)
    model_bytes = len(cli.policy_bytes(tmp_path / "A", 1))
    assert 0 < a[1]["learner/weight_sync_bytes"] < model_bytes / 4
    for key in ("reward/mean", "learner/loss", "learner/kl", "rollout/response_len", "rollout/version"):
        assert [r.get(key) for r in b] == [r.get(key) for r in a], key
    for step in (1, 2, 3):
        assert cli.policy_bytes(tmp_path / "B", step) == cli.policy_bytes(tmp_path / "A", step), step
    assert cli.policy_bytes(tmp_path / "A", 3) != cli.policy_bytes(tmp_path / "A", 1)
    from rl.store import read_store

    ours, theirs = read_store(tmp_path / "B" / "store"), read_store(tmp_path / "A" / "store")
    assert ours["response_ids"] == theirs["response_ids"] and ours["reward"] == theirs["reward"]
