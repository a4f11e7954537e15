"""Per-rank learner shards (rl.learner_shards), one torch-backend rank without Ray: a checkpoint written through them
resumes bitwise, the writer hands back plain file entries only, and a bad shard or layout fails in one line naming
the file. The 2-rank DeepSpeed ZeRO-2/3 case is in test_deepspeed.py."""
from __future__ import annotations

import dataclasses
import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from rl.checkpoint import Checkpoint, CheckpointError, WrittenFiles, capture_rng, load_checkpoint, save_checkpoint
from rl.learner import Learner, LearnerConfig
from rl.learner_shards import check_layout, check_resumable, load_legacy_state, load_rank_shard, save_rank_shard
from rl.optim import OptimConfig
from rollout.models.loading import load_policy, save_policy

_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

CONFIG = LearnerConfig(algorithm="diffu_grpo", estimator="one_step", mu=2, micro_batch_size=2, shuffle=True,
                       optim=OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine", total_steps=10, weight_decay=0.1))


def tensors_in(obj, where: str = "") -> list[str]:
    """Where in obj (dicts, lists, tuples, dataclasses) a tensor sits; [] when nowhere."""
    if isinstance(obj, torch.Tensor):
        return [where or "."]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [w for f in dataclasses.fields(obj) for w in tensors_in(getattr(obj, f.name), f"{where}.{f.name}")]
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in tensors_in(k, f"{where}[key]") + tensors_in(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple, set)):
        return [w for i, v in enumerate(obj) for w in tensors_in(v, f"{where}[{i}]")]
    return []


def test_tensor_walk_finds_nested_tensors():
    found = tensors_in(WrittenFiles({"a": {"size": 1}}, meta={"x": [1, (2, {"t": torch.zeros(1)})]}))
    assert found == [".meta['x'][1][1]['t']"]
    assert tensors_in(WrittenFiles({"a": {"size": 1}})) == []


def _checkpoint(learner: Learner, root: Path, returned: list) -> Path:
    def learner_writer(folder: Path) -> WrittenFiles:
        result = WrittenFiles(save_rank_shard(learner, folder, 0, 1))
        returned.append(result)
        return result

    return save_checkpoint(root, 1, writers={"policy": lambda d: save_policy(learner.policy, d),
                                             "learner": learner_writer},
                           state={"data": {}, "store": {}}, rng=capture_rng(), recipe_yaml="")


def test_checkpoint_through_rank_shards_resumes_bitwise(tiny_model_dirs, tmp_path):
    ref = load_policy(tiny_model_dirs["block"])  # the initial checkpoint is the reference, also on resume
    a = Learner(load_policy(tiny_model_dirs["block"]), CONFIG, ref_policy=ref)
    first, second = (_helpers.make_trajectories(a.policy, 4, seed=s, prefix=p) for s, p in ((0, "a"), (1, "b")))
    a.update(first)
    returned: list = []
    ckpt = load_checkpoint(_checkpoint(a, tmp_path / "checkpoints", returned))
    assert tensors_in(returned) == [] and set(returned[0].files) == {"rank_00000.pt", "layout.json"}
    # Nor the state in another form (bytes of a torch.save, numpy arrays): what crosses is a few entries' worth.
    shard_bytes = (ckpt.learner_dir / "rank_00000.pt").stat().st_size
    assert len(pickle.dumps(returned)) < min(4096, shard_bytes // 20), (len(pickle.dumps(returned)), shard_bytes)
    assert check_layout(ckpt.learner_dir, world_size=1, backend="torch", zero_stage=2)["backend"] == "torch"

    b = Learner(load_policy(ckpt.policy_dir), CONFIG, ref_policy=ref)  # as the driver resumes
    load_rank_shard(b, ckpt.learner_dir, 0, 1)
    assert b.updates == 1 and b.optimizer_steps == a.optimizer_steps
    ma, mb = a.update(second), b.update(second)
    for name, w in _helpers.weights(a.policy).items():
        assert torch.equal(w, _helpers.weights(b.policy)[name]), name
    for key in ("loss", "ratio_mean", "grad_norm", "lr"):
        assert ma[key] == mb[key], key


def test_layout_mismatch_and_bad_shards_fail_in_one_line(tiny_model_dirs, tmp_path):
    learner = Learner(load_policy(tiny_model_dirs["block"]), CONFIG)
    folder = tmp_path / "learner"
    save_rank_shard(learner, folder, 0, 1)
    for kwargs, message in (({"world_size": 2, "backend": "torch", "zero_stage": 2}, "world_size 1, this run has 2"),
                            ({"world_size": 1, "backend": "deepspeed", "zero_stage": 3}, "backend torch")):
        with pytest.raises(CheckpointError, match=message) as info:
            check_layout(folder, **kwargs)
        assert "layout.json" in str(info.value) and "\n" not in str(info.value)
    fresh = Learner(load_policy(tiny_model_dirs["block"]), CONFIG)
    with pytest.raises(CheckpointError, match="rank_00000.pt: shard of rank 0 of 1, expected rank 0 of 2"):
        load_rank_shard(fresh, folder, 0, 2)
    with pytest.raises(CheckpointError, match="rank_00001.pt: missing"):
        load_rank_shard(fresh, folder, 1, 2)
    shard = folder / "rank_00000.pt"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size: only reading it can tell
    with pytest.raises(CheckpointError, match="rank_00000.pt: unreadable learner shard") as info:
        load_rank_shard(fresh, folder, 0, 1)
    assert "\n" not in str(info.value)
    (folder / "layout.json").unlink()
    with pytest.raises(CheckpointError, match="layout.json: missing"):
        check_layout(folder, world_size=1, backend="torch", zero_stage=None)


@pytest.mark.parametrize("own_ok, peer_ok", [(False, True), (True, False), (True, True)])
def test_a_rank_that_cannot_write_fails_every_rank_at_once(tiny_model_dirs, tmp_path, monkeypatch, own_ok, peer_ok):
    """Rank 0 of 2 (the other rank's answer given by a stand-in all_reduce): a full disk on either rank makes both
    raise after one agreement, instead of the writer raising and its peer waiting in a barrier for the group's
    timeout (30 min under gloo). The rank that could not write names its file."""
    import torch.distributed as dist

    from rl.learner_shards import PeerShardError

    learner = Learner(load_policy(tiny_model_dirs["block"]), CONFIG)
    flags = []

    def all_reduce(flag, op=None):
        flags.append(int(flag.item()))
        flag.fill_(min(int(flag.item()), int(peer_ok)))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *args: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: pytest.fail("a bare barrier"))
    if not own_ok and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    if not own_ok:  # a real full disk: torch.save into /dev/full (its writer raises RuntimeError, not OSError)
        import rl.learner_shards

        monkeypatch.setattr(rl.learner_shards, "shard_name", lambda rank: "/dev/full")
    if own_ok and peer_ok:
        assert save_rank_shard(learner, tmp_path / "learner", 0, 2)  # this rank's share of the entries
        assert (tmp_path / "learner" / "rank_00000.pt").is_file()
    else:
        with pytest.raises(CheckpointError) as info:
            save_rank_shard(learner, tmp_path / "learner", 0, 2)
        assert isinstance(info.value, PeerShardError) == own_ok and "\n" not in str(info.value)
        assert own_ok or str(info.value).startswith("/dev/full: could not be written (RuntimeError: ")
    assert flags == [int(own_ok)]  # exactly one agreement, reached even by the rank that failed


def test_format_1_learner_pt_loads_into_one_torch_rank(tiny_model_dirs, tmp_path):
    a = Learner(load_policy(tiny_model_dirs["block"]), CONFIG)
    a.update(_helpers.make_trajectories(a.policy, 4))
    torch.save({"world_size": 1, "ranks": [a.state_dict()]}, tmp_path / "learner.pt")  # what the driver wrote
    b = Learner(load_policy(tiny_model_dirs["block"]), CONFIG)
    load_legacy_state(b, tmp_path / "learner.pt", 1)
    assert b.updates == 1 and b.optimizer_steps == a.optimizer_steps
    state_a, state_b = a.backend.optimizer.state_dict(), b.backend.optimizer.state_dict()
    for i, s in state_a["state"].items():
        assert all(torch.equal(v, state_b["state"][i][k]) for k, v in s.items())
    with pytest.raises(CheckpointError, match="resumes only a one-rank torch learner, this run has 2"):
        load_legacy_state(b, tmp_path / "learner.pt", 2)
    ckpt = Checkpoint(tmp_path, 1, {}, {}, "")  # what preflight checks before Ray starts
    check_resumable(ckpt, world_size=1, backend="torch", zero_stage=2)
    with pytest.raises(CheckpointError, match="learner.pt: .* this run has 2 deepspeed rank"):
        check_resumable(ckpt, world_size=2, backend="deepspeed", zero_stage=2)
    (tmp_path / "learner.pt").unlink()
    with pytest.raises(CheckpointError, match="learner: missing"):
        check_resumable(ckpt, world_size=1, backend="torch", zero_stage=2)


def test_no_learner_group_call_returns_learner_state():
    """The driver cannot fetch optimizer state: the group and its ranks offer no call that returns it (checkpoints go
    through save_state, whose result test_deepspeed.py walks for tensors)."""
    from rl.learner_worker import LearnerGroup, LearnerWorker

    for cls in (LearnerGroup, LearnerWorker):
        assert not hasattr(cls, "state_dict") and not hasattr(cls, "load_state_dict"), cls
        assert hasattr(cls, "save_state") and hasattr(cls, "load_state")


@pytest.mark.slow
@pytest.mark.ray
def test_group_checkpoint_returns_entries_and_a_bad_shard_fails_in_one_line(local_ray, tiny_model_dirs, tmp_path):
    """Through Ray (one torch rank): save_state hands back no tensor; a rank's unreadable shard reaches the caller
    as that rank's one-line CheckpointError, not Ray's multi-line task error."""
    from functools import partial

    from rl.learner_worker import LearnerGroup

    group = LearnerGroup(partial(load_policy, tiny_model_dirs["block"]), CONFIG)
    try:
        written = group.save_state(str(tmp_path / "learner"))
        assert tensors_in(written) == [] and written.meta["backend"] == "torch"
        shard = tmp_path / "learner" / "rank_00000.pt"
        assert written.files["rank_00000.pt"]["size"] == shard.stat().st_size
        shard.write_bytes(b"\0" * shard.stat().st_size)
        with pytest.raises(CheckpointError, match="rank_00000.pt: unreadable learner shard") as info:
            group.load_state(str(tmp_path / "learner"))
        assert type(info.value) is CheckpointError and "\n" not in str(info.value)
    finally:
        group.shutdown()
