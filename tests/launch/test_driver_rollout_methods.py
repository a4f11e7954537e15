"""End to end: JustGRPO and IGPO run three RL steps through the driver (run_training in process, one local Ray
shared by the module, tiny recipes) with finite
metrics; the learner's recomputed log-probs agree with the rollout's (JustGRPO: exact AR log-probs)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_spec = importlib.util.spec_from_file_location("_cli_runner", Path(__file__).with_name("cli_runner.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# The `format` built-in with a digit pattern: a dense signal for a random-init model (most groups mix 0 and 1).
DENSE_REWARD = ["reward.1.fn=format", r"reward.1.kwargs.pattern=\d"]


@pytest.fixture(autouse=True)
def _ray_and_cwd(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def train(tmp_path: Path, recipe: str, *overrides: str) -> list[dict]:
    out = tmp_path / "run"
    done = cli.train_in_process(cli.REPO / "recipes" / recipe, f"output_dir={out}", "trainer.total_steps=3",
                                "trainer.checkpoint_every=3", *overrides)
    assert done.steps == 3
    rows = cli.metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)
               and k.startswith(("learner/", "reward/", "adv/"))}
        assert not bad, (r["step"], bad)
    return rows


def test_justgrpo_three_steps(tmp_path):
    rows = train(tmp_path, "tiny-justgrpo.yaml", *DENSE_REWARD)
    trained = [r for r in rows if r.get("learner/samples", 0) > 0]
    assert trained, "no step reached the learner"
    for r in trained:
        assert r["learner/logp_mismatch_max"] < 1e-4  # the AR log-probs are recomputed exactly
        assert r["learner/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # one inner step: on-policy
        assert r["learner/clipfrac"] == 0.0
        # only samples with A != 0 are trained (JustGRPO's valid_samples)
        assert r["learner/samples"] == round(r["adv/frac_samples_kept"] * 16)


def test_igpo_three_steps(tmp_path):
    """A random-init model answers every arithmetic prompt wrong, so every group is inpainted (the hint: the row's
    answer, tiny-igpo's reference_field) and regenerated each step."""
    rows = train(tmp_path, "tiny-igpo.yaml")
    for r in rows:
        assert r["igpo/groups_triggered"] >= r["igpo/groups_inpainted"] > 0
        assert 0.0 <= r["igpo/hinted_accuracy"] <= 1.0 and r["igpo/samples_replaced"] >= 0
        assert r["time/igpo_s"] > 0
    trained = [r for r in rows if r.get("learner/samples", 0) > 0]
    assert trained, "no step reached the learner"
    for r in trained:
        assert r["learner/clipfrac"] >= 0.0 and math.isfinite(r["learner/loss"])
