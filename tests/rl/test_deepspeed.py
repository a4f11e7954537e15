"""Data-parallel DeepSpeed ZeRO learner under Ray actors == the single-process torch learner; its checkpoint is
written by the ranks themselves (no tensor reaches the caller) and a new group resumed from it continues bitwise."""
from __future__ import annotations

import importlib.util
import pickle
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
    # Dummy micro-batches of the rank with nothing left: 1 forward (the trajectory estimator scores every step group
    # in one) x 2 inner iterations (ZeRO-3 also scores old-pass slots another rank needs, to keep the collective
    # forwards in step).
    dummies = m_ds["forwards"] - m_ref["forwards"]
    assert dummies == 2 if zero_stage == 2 else dummies >= 2
    moved = 0.0
    for name, w in dict(single.causal_lm.named_parameters()).items():
        torch.testing.assert_close(ds_weights[name], w.detach(), rtol=1e-4, atol=1e-6)
        moved = max(moved, float((w.detach() - load_policy(path).causal_lm.state_dict()[name]).abs().max()))
    assert moved > 1e-3
    # The checkpoint call returned file entries and the layout, no tensor; the ranks' ZeRO shards are on disk.
    assert len(pickle.dumps(written)) < 8192  # nor the state serialized some other way (bytes, numpy)
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


def _reference_shard(worker) -> tuple[int, int]:
    """(elements this rank holds, elements in all) of the learner's reference weights (runs inside the actor)."""
    params = list(worker.learner.ref_policy.model.parameters())
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


@pytest.mark.slow
@pytest.mark.ray
def test_zero3_partitioned_reference_equals_the_unpartitioned_one(local_ray, tiny_model_dirs):
    """KL to the reference on 2 ZeRO-3 ranks, each holding half the reference's weights (an inference-only
    DeepSpeed engine), equals the single-process learner's with a whole reference."""
    from rl.learner_worker import LearnerGroup

    path = tiny_model_dirs["block"]
    single = load_policy(path)
    trajs = make_trajectories(single, 4)
    kl = {"loss": {"beta": 0.05, "kl_reference": "ref"}}
    m_ref = Learner(single, _config(grad_accum=2, **kl)).update(trajs)
    group = LearnerGroup(partial(load_policy, path), _config(grad_accum=1, backend="deepspeed", zero_stage=3, **kl),
                         num_workers=2, ref_fn=partial(load_policy, path))
    try:
        m_ds = group.update(trajs)
        shards = local_ray.get([w.__ray_call__.remote(_reference_shard) for w in group.workers])
        ds_weights = group.policy_state()
    finally:
        group.shutdown()
    total = shards[0][1]
    assert all(whole == total for _, whole in shards) and sum(held for held, _ in shards) >= total
    assert all(held <= total // 2 + 64 for held, _ in shards), shards  # each rank: its half (plus padding)
    assert m_ref["kl"] > 1e-6 and m_ds["forwards_ref"] >= m_ref["forwards_ref"]
    assert m_ds["kl"] == pytest.approx(m_ref["kl"], rel=1e-4)
    for name, w in single.causal_lm.named_parameters():  # the KL gradient went through the same reference
        torch.testing.assert_close(ds_weights[name], w.detach(), rtol=1e-4, atol=1e-6)


_BF16_ZERO = """
import sys, torch
from rollout.models.loading import load_policy
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
sys.path.insert(0, sys.argv[2])
from test_learner import make_trajectories
torch.set_num_threads(1)


def _fp32_partitions(opt):  # DeepSpeed's fp32 master partitions (ZeRO-1/2 and ZeRO-3 name them differently)
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    raise AssertionError("no fp32 partitions on this DeepSpeed optimizer")


for stage in (2, 3):
    for bf16 in (False, True):
        pol = load_policy(sys.argv[1], dtype=torch.bfloat16)
        learner = Learner(pol, LearnerConfig(algorithm="tracerl", mu=1, bf16=bf16, backend="deepspeed",
                                             zero_stage=stage, optim=OptimConfig(lr=1e-6)))
        start = [p.detach().clone() for p in _fp32_partitions(learner.backend.optimizer)]
        assert start and all(p.dtype == torch.float32 for p in start)
        assert all(torch.equal(p, p.bfloat16().float()) for p in start)  # the masters start as the bf16 weights
        learner.update(make_trajectories(pol, 4))
        after = _fp32_partitions(learner.backend.optimizer)
        moved = float(sum(int((a != s).sum()) for a, s in zip(after, start)) / sum(s.numel() for s in start))
        assert pol.dtype == torch.bfloat16
        print(f"zero{stage} bf16={bf16} moved {moved:.4f}")
        assert moved >= 0.9, moved
"""


_ACCUMULATION = """
import sys, torch
from rollout.models.loading import load_policy
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
sys.path.insert(0, sys.argv[2])
from test_learner import make_trajectories
torch.set_num_threads(1)
runs = {}
for backend, stage in (("torch", 2), ("deepspeed", 2), ("deepspeed", 3)):
    pol = load_policy(sys.argv[1])
    cfg = LearnerConfig(algorithm="tracerl", mu=2, micro_batch_size=1, backend=backend, zero_stage=stage,
                        loss={"beta": 0.05, "kl_reference": "ref"}, optim=OptimConfig(lr=1e-3))
    m = Learner(pol, cfg, ref_policy=load_policy(sys.argv[1])).update(make_trajectories(pol, 4))
    runs[backend, stage] = m
    print(backend, stage, m["grad_norm"], m["kl"])
want = runs["torch", 2]
for key in (("deepspeed", 2), ("deepspeed", 3)):
    got = runs[key]
    assert got["optimizer_steps"] == want["optimizer_steps"] == 2
    assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"], (key, got, want)
    assert abs(got["kl"] - want["kl"]) <= 1e-4 * want["kl"], (key, got, want)
"""


def _run_script(script: str, tiny_model_dirs) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dirs["block"]), str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_zero_accumulates_micro_batch_gradients(tiny_model_dirs):
    """4 micro-batches per optimizer step: ZeRO-2 and ZeRO-3 give the torch learner's gradient norm and KL. ZeRO-3
    kept only the last micro-batch's gradient before the backend advanced DeepSpeed's micro-step itself (grad norm
    1.380 against 2.352). A world of one, in a subprocess so this test process never joins a process group."""
    assert _run_script(_ACCUMULATION, tiny_model_dirs).count("deepspeed") == 2


@pytest.mark.slow
def test_zero_bf16_weights_train_through_fp32_masters(tiny_model_dirs):
    """bf16 weights under ZeRO-2/3, learner.bf16 on or off: DeepSpeed's fp32 partitions are the masters, and one
    step at lr 1e-6 moves >= 90% of their elements (one process: a world of one, in a subprocess so this test
    process never joins a torch.distributed group)."""
    assert _run_script(_BF16_ZERO, tiny_model_dirs).count("moved") == 4


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_zero3_packed_micro_batches_equal_single_process(local_ray, tiny_model_dirs):
    """learner.pack_tokens under ZeRO-3: every rank plans every rank's token-budget micro-batches and pads to the
    most (collective forwards stay in step), and the update equals the single-process padded one."""
    from rl.learner_worker import LearnerGroup

    path = tiny_model_dirs["block"]
    single = load_policy(path)
    trajs = make_trajectories(single, 5)  # layouts of 20-22 tokens: 44 packs two per micro-batch
    m_ref = Learner(single, _config(grad_accum=2, micro_batch_size=2)).update(trajs)
    group = LearnerGroup(partial(load_policy, path), _config(grad_accum=1, micro_batch_size=2, backend="deepspeed",
                                                             zero_stage=3, pack_tokens=44), num_workers=2)
    try:
        m_ds = group.update(trajs)
        ds_weights = group.policy_state()
    finally:
        group.shutdown()
    assert m_ds["optimizer_steps"] == m_ref["optimizer_steps"] and m_ds["nan_skipped"] == 0
    assert m_ds["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-4)
    for name, w in dict(single.causal_lm.named_parameters()).items():
        torch.testing.assert_close(ds_weights[name], w.detach(), rtol=1e-4, atol=1e-6)
