"""End to end: the driver (run_training in process, one local Ray shared by the module) on a tiny DiffusionGemma
built offline (model.tiny: diffusion-gemma), three RL steps with TraceRL and with GDPO's sequence-level loss on the
canvas_trace estimator: every metric finite, the weights change, the learner recomputes the rollout's log-probs
through the whole loop (weight sync included), and the trajectory store keeps each rollout's canvas trace."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

RECIPE = cli.REPO / "recipes" / "tiny-tracerl-diffusion-gemma.yaml"
# a digit anywhere: a dense signal for a random-init model, so groups mix 0 and 1 and advantages are non-zero
OVERRIDES = ["trainer.total_steps=3", "trainer.checkpoint_every=3", "reward.1.fn=format", r"reward.1.kwargs.pattern=\d"]


@pytest.mark.parametrize("algorithm", ["tracerl", "gdpo"])
def test_three_steps_train_and_keep_metrics_finite(local_ray, tmp_path, monkeypatch, algorithm):
    monkeypatch.chdir(tmp_path)
    recipe = RECIPE
    if algorithm == "gdpo":
        recipe = tmp_path / "gdpo.yaml"
        recipe.write_text(f"extends: {RECIPE}\nname: tiny-gdpo-diffusion-gemma\nalgorithm:\n  name: gdpo\n"
                          "estimator:\n  name: canvas_trace\n")
    run = tmp_path / "run"
    assert cli.train_in_process(recipe, f"output_dir={run}", *OVERRIDES).steps == 3
    rows = cli.metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert row["learner/logp_mismatch_max"] < 1e-5
    assert any(r["learner/grad_norm"] > 0 for r in rows)
    init = (run / "model_init" / "model.safetensors").read_bytes()
    assert cli.policy_bytes(run, 3) != init  # the weights changed
    import pyarrow.parquet as pq

    from rollout.canvas_trace import CanvasTrace

    table = pq.read_table(sorted((run / "store").glob("step_*.parquet"))[0]).to_pylist()
    trace = CanvasTrace.from_bytes(table[0]["canvas_trace"])
    trace.validate(len(table[0]["response_ids"]))
    assert json.loads(table[0]["sampling"])["decoder"] == "diffusion_gemma_entropy_bound"
