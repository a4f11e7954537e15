"""benchmarks/gpu_smoke.py at its tiny shape on CPU: the whole RL step runs and every figure is reported."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"
_spec = importlib.util.spec_from_file_location("gpu_smoke", _path)
gpu_smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_smoke)


def test_tiny_rl_step_on_cpu(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    figures = gpu_smoke.main(["--tiny", "--device", "cpu", "--workdir", str(tmp_path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rollout_tokens"] == figures["rollout_tokens"]
    assert figures["device"] == "cpu" and figures["dtype"] == "float32"
    assert figures["rollout_tokens"] == 4 * 8 and figures["rollout_tokens_per_s"] > 0  # 4 requests x 8 tokens
    assert figures["optimizer_steps"] == 1 and figures["sync_chunks"] >= 1
    assert figures["sync_exact"] is True  # the rollout engine holds the updated weights, bit for bit
    assert figures["checkpoint_bytes"] > 0 and figures["checkpoint_s"] > 0
    for phase in ("rollout", "learner_update", "weight_sync", "checkpoint"):
        assert figures[f"peak_{phase}_bytes"] >= 0 and phase in printed
    hs = figures["host_syncs_per_step"]
    assert isinstance(hs, float) and 0 < hs <= 1  # hostsync's counter (merged): at most one per decoding step
    assert figures["placement"]["rollout"]["model"] == ["cpu"] and figures["placement"]["learner"]["policy"] == ["cpu"]
    for line in ("rollout tokens/s", "host syncs per step", "weight sync", "checkpoint", "peak memory"):
        assert line in printed
