"""Checkpoints: atomic write, `latest` pointer, keep-last-K, manifest validation, RNG round trip, policy format."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from rl.checkpoint import (CheckpointError, WrittenFiles, capture_rng, file_entry, list_checkpoints, load_checkpoint,
                           resolve_checkpoint, restore_rng, save_checkpoint)


def _fake_policy(folder):
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 8)


def _fake_learner(folder):
    """As the learner ranks do: write their shard files and describe them (the driver never reads them)."""
    torch.save({"optimizer": {"lr": torch.tensor(0.5)}}, folder / "rank_00000.pt")
    (folder / "layout.json").write_text("{}")
    return WrittenFiles({name: file_entry(folder / name) for name in ("rank_00000.pt", "layout.json")})


def _save(root, step, keep_last=3, **kw):
    return save_checkpoint(
        root, step, writers={"policy": _fake_policy, "learner": _fake_learner},
        state={"version": step, "data": {"position": step * 4}, "store": {"files": [], "rows": 0}},
        rng=capture_rng(), recipe_yaml="name: x\n", keep_last=keep_last, **kw)


def test_save_load_latest_and_keep_last(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    ckpt = load_checkpoint(tmp_path / "run")  # a run dir resolves through `latest`
    assert ckpt.step == 4 and ckpt.state["data"] == {"position": 16} and ckpt.recipe_yaml == "name: x\n"
    assert torch.load(ckpt.learner_dir / "rank_00000.pt", weights_only=True)["optimizer"]["lr"].item() == 0.5
    assert ckpt.legacy_learner_file is None
    assert load_checkpoint(root / "step_000003").step == 3
    assert not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("failing, error", [("policy", OSError("disk full")), ("learner", KeyboardInterrupt())])
def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, failing, error):
    root = tmp_path / "checkpoints"
    _save(root, 1)

    def broken(folder):  # half written (a rank's shard is on disk), then a full disk or Ctrl-C
        (folder / "rank_00000.pt").write_bytes(b"half")
        raise error

    writers = {"policy": _fake_policy, "learner": _fake_learner, failing: broken}
    with pytest.raises(type(error)):
        save_checkpoint(root, 2, writers=writers, state={"data": {}, "store": {}}, rng=capture_rng(), recipe_yaml="")
    assert [p.name for p in list_checkpoints(root)] == ["step_000001"]
    assert resolve_checkpoint(root).name == "step_000001"
    assert not list(root.glob(".tmp-*"))


def test_rewriting_a_step_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    _save(root, 2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000002"]
    assert load_checkpoint(root).step == 2


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "policy" / "model.safetensors").write_bytes(b"short"), "model.safetensors: 5 bytes"),
    (lambda p: (p / "policy" / "model.safetensors").write_bytes(bytes(2048)), "SHA-256 differs"),
    (lambda p: (p / "state.json").unlink(), "state.json: missing"),
    (lambda p: (p / "learner" / "rank_00000.pt").unlink(), "learner/rank_00000.pt: missing"),
    (lambda p: (p / "learner" / "rank_00000.pt").write_bytes(b"\0" * (p / "learner" / "rank_00000.pt").stat().st_size),
     "learner/rank_00000.pt: SHA-256 differs"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json: corrupt JSON"),
    (lambda p: (p.parent / "latest").write_text("../../etc"), "latest: corrupt pointer"),
    (lambda p: (p.parent / "latest").write_text("step_000099"), "points at step_000099"),
])
def test_corrupt_checkpoints_fail_with_one_line_naming_the_file(tmp_path, damage, message):
    path = _save(tmp_path / "checkpoints", 1)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_checkpoint_messages(tmp_path):
    with pytest.raises(CheckpointError, match="no such run"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        resolve_checkpoint(tmp_path / "run")


def test_rng_round_trip_is_exact(tmp_path):
    gens = {"torch": torch.Generator().manual_seed(3), "numpy": np.random.default_rng(4), "py": random.Random(5)}
    torch.rand(3, generator=gens["torch"])
    state = json.loads(json.dumps(capture_rng(gens)))  # through JSON, as on disk
    expected = (torch.rand(4, generator=gens["torch"]), gens["numpy"].random(3), gens["py"].random(),
                torch.rand(2), np.random.rand(2), random.random())
    fresh = {"torch": torch.Generator(), "numpy": np.random.default_rng(0), "py": random.Random(0)}
    restore_rng(state, fresh)
    again = (torch.rand(4, generator=fresh["torch"]), fresh["numpy"].random(3), fresh["py"].random(),
             torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    assert np.array_equal(expected[4], again[4]) and expected[5] == again[5]
    with pytest.raises(CheckpointError, match="generators"):
        restore_rng(state, {"torch": torch.Generator()})


def test_sdar_policy_saved_in_sdar_format(tmp_path, tiny_model_dirs):
    from rollout.models.loading import load_policy, save_policy

    policy = load_policy(tiny_model_dirs["sdar"])
    path = save_checkpoint(tmp_path, 1, writers={"policy": lambda d: save_policy(policy, d)},
                           state={"data": {}, "store": {}}, rng=capture_rng(), recipe_yaml="")
    ckpt = load_checkpoint(path)
    assert json.loads((ckpt.policy_dir / "config.json").read_text())["model_type"] == "sdar"
    reloaded = load_policy(ckpt.policy_dir)
    saved, loaded = policy.model.state_dict(), reloaded.model.state_dict()
    assert list(saved) == list(loaded) and saved
    for name, a in saved.items():
        assert torch.equal(a, loaded[name]), name


def test_described_files_are_not_read_but_must_match_the_disk(tmp_path):
    def described(folder):  # an entry the driver cannot have computed: a made-up hash
        (folder / "a.pt").write_bytes(b"12345")
        return WrittenFiles({"a.pt": {"size": 5, "sha256": "f" * 64}})

    path = save_checkpoint(tmp_path / "checkpoints", 1, writers={"policy": _fake_policy, "learner": described},
                           state={"data": {}, "store": {}}, rng=capture_rng(), recipe_yaml="")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["files"]["learner/a.pt"] == {"size": 5, "sha256": "f" * 64}
    assert manifest["files"]["policy/config.json"] == file_entry(path / "policy" / "config.json")
    with pytest.raises(CheckpointError, match="a.pt: SHA-256 differs"):  # and verified on load like any file
        load_checkpoint(path)

    def lying(folder):
        (folder / "a.pt").write_bytes(b"12345")
        return WrittenFiles({"a.pt": {"size": 4, "sha256": "0" * 64}})

    def phantom(folder):
        return WrittenFiles({"ghost.pt": {"size": 4}})

    for writer, message in ((lying, "a.pt: 5 bytes on disk, its writer reported 4"),
                            (phantom, "ghost.pt: described by its writer but not on disk")):
        with pytest.raises(CheckpointError, match=message):
            save_checkpoint(tmp_path / "checkpoints", 2, writers={"policy": _fake_policy, "learner": writer},
                            state={"data": {}, "store": {}}, rng=capture_rng(), recipe_yaml="")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_format_1_checkpoint_with_driver_written_learner_pt_still_loads(tmp_path):
    path = _save(tmp_path / "checkpoints", 1)
    shutil.rmtree(path / "learner")
    torch.save({"world_size": 1, "ranks": [{"format": 1}]}, path / "learner.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = 1
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("learner/")}
    manifest["files"]["learner.pt"] = file_entry(path / "learner.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    ckpt = load_checkpoint(path)
    assert ckpt.legacy_learner_file == path / "learner.pt"
