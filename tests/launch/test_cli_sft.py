"""`diffrl sft`: writes a loadable checkpoint with its summary; never overwrites an existing one silently."""
from __future__ import annotations

import json

from launch.cli import main
from rollout.models.loading import load_policy


def test_sft_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "sft"
    args = [str(out), "--hidden-size", "32", "--num-layers", "1", "--steps", "6", "--batch-size", "8", "-q"]
    assert main(["sft", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["heldout_masked_ce_after"] < summary["heldout_masked_ce_before"]
    assert load_policy(out).spec.kind == "block"
    before = (out / "model.safetensors").read_bytes()
    assert main(["sft", *args]) == 2  # one-line error, exit status 2
    assert "exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
