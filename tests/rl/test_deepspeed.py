"""Data-parallel DeepSpeed ZeRO learner under Ray actors == the single-process torch learner; its checkpoint is
written by the ranks themselves (no tensor reaches the caller) and a new group resumed from it continues bitwise."""
from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rollout.models.loading import load_policy

pytest.importorskip("deepspeed")
_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_trajectories = _helpers.make_trajectories
_spec = importlib.util.spec_from_file_location("_shard_tests", Path(__file__).with_name("test_learner_shards.py"))
_shard_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shard_helpers)
tensors_in = _shard_helpers.tensors_in


def _config(**overrides) -> LearnerConfig:
    # lr/eps small: AdamW's first steps are then ~ proportional to the gradient, so weights measure gradients.
    base = {"algorithm": "tracerl", "estimator": "trajectory", "mu": 2, "micro_batch_size": 1, "shuffle": True,
            "grad_clip": 1.0, "optim": OptimConfig(lr=1e2, eps=1e4, weight_decay=0.01), "seed": 3}
    return LearnerConfig(**{**base, **overrides})


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_workers_zero_equal_single_process(local_ray, tiny_model_dirs, zero_stage, tmp_path):
    from rl.learner_worker import LearnerGroup

    path = tiny_model_dirs["block"]
    single = load_policy(path)
    trajs = make_trajectories(single, 5)  # odd: one rank gets a dummy micro-batch in the last minibatch
    # Global minibatch = micro_batch_size x grad_accum x workers = 2 in both.
    ref = Learner(single, _config(grad_accum=2))
    m_ref = ref.update(trajs)
    config = _config(grad_accum=1, backend="deepspeed", zero_stage=zero_stage)
    group = LearnerGroup(partial(load_policy, path), config, num_workers=2)
    next_batch = make_trajectories(single, 2, prefix="next")
    try:
        m_ds = group.update(trajs)
        ds_weights = group.policy_state()  # ZeRO-3: gathered from the partitions on every rank
        chunks = [local_ray.get(ref) for ref in group.weight_chunks(1 << 16)]
        written = group.save_state(str(tmp_path / "learner"))  # each rank writes its own shard
        saved = load_policy(group.save_policy(str(tmp_path / "policy")))  # ZeRO-3: gathered for rank 0 to write
        m_next = group.update(next_batch)
        after_next = group.policy_state()
    finally:
        group.shutdown()
    # Resume as the driver does: a new group on the checkpoint's policy, each rank loading its own shard.
    resumed = LearnerGroup(partial(load_policy, str(tmp_path / "policy")), config, num_workers=2)
    try:
        resumed.load_state(str(tmp_path / "learner"))
        m_resumed = resumed.update(next_batch)
        after_resumed = resumed.policy_state()
    finally:
        resumed.shutdown()
    assert m_ds["optimizer_steps"] == m_ref["optimizer_steps"] == 6 and m_ds["nan_skipped"] == 0
    assert m_ds["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-4)
    # Dummy micro-batches of the rank with nothing left: 2 passes x 2 inner iterations (ZeRO-3 also scores
    # old-pass slots another rank needs, to keep the collective forwards in step).
    dummies = m_ds["forwards"] - m_ref["forwards"]
    assert dummies == 4 if zero_stage == 2 else dummies >= 4
    moved = 0.0
    for name, w in dict(single.causal_lm.named_parameters()).items():
        torch.testing.assert_close(ds_weights[name], w.detach(), rtol=1e-4, atol=1e-6)
        moved = max(moved, float((w.detach() - load_policy(path).causal_lm.state_dict()[name]).abs().max()))
    assert moved > 1e-3
    # The checkpoint call returned file entries and the layout, no tensor; the ranks' ZeRO shards are on disk.
    assert tensors_in(written) == [] and written.meta == {"format": 1, "world_size": 2, "backend": "deepspeed",
                                                          "zero_stage": zero_stage}
    optim = sorted(f for f in written.files if f.endswith("optim_states.pt"))
    assert [Path(f).name.split("_mp_")[0] for f in optim] == ["zero_pp_rank_0", "zero_pp_rank_1"]
    assert set(written.files) == {str(p.relative_to(tmp_path / "learner"))
                                  for p in (tmp_path / "learner").rglob("*") if p.is_file()}
    # ... and the resumed group continues bitwise.
    assert set(after_resumed) == set(after_next)
    for name, w in after_next.items():
        assert torch.equal(after_resumed[name], w), name
    for key in ("loss", "grad_norm", "optimizer_steps", "update"):
        assert m_resumed[key] == m_next[key], key
    assert all(torch.equal(p.detach(), ds_weights[n]) for n, p in saved.causal_lm.named_parameters())
    assert m_next["weight_sync_bytes"] == sum(t.numel() * 4 for t in ds_weights.values())
    streamed = {name: t for _, entries in chunks for name, t in entries}
    assert all(v == 1 for v, _ in chunks) and set(streamed) == set(ds_weights)
    assert all(torch.equal(streamed[n], ds_weights[n]) for n in streamed)
