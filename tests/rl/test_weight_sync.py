"""Bucketed weight streaming: byte limits, exact round trips into a fresh policy and into TorchEngine (whole and
row-sliced tensors), strict receiver checks, LoRA delta sync == PEFT's merged weights (repeatedly, without drift),
end to end from a LoRA learner into the rollout engine. Receiver-only checks: tests/rollout/test_weight_receiver.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.weight_sync import SyncStats, chunk_weights, merged_weights, nbytes, stream_weights
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy, save_policy
from rollout.models.lora import apply_lora
from rollout.weight_receiver import WeightReceiver
from tests.rl.weight_helpers import parameters_of, perturbed_policy

_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


@pytest.mark.parametrize("bucket_bytes", [20_000, 1 << 20])
def test_buckets_respect_limit_and_round_trip_exactly(tiny_model_dirs, bucket_bytes):
    src = perturbed_policy(tiny_model_dirs["block"])
    learner = Learner(src, LearnerConfig())
    stats = SyncStats()
    chunks = list(learner.weight_buckets(bucket_bytes, version=7, stats=stats))
    sizes = [sum(nbytes(t) for _, t in entries) for _, entries in chunks]
    assert max(sizes) <= bucket_bytes and all(v == 7 for v, _ in chunks)
    total = sum(nbytes(p) for p in src.model.parameters())
    assert stats.bytes == total and stats.chunks == len(chunks)
    if bucket_bytes == 20_000:
        assert any("@" in name for _, entries in chunks for name, _ in entries)  # embeddings were row-sliced
        assert len(chunks) >= total // bucket_bytes
    dst = load_policy(tiny_model_dirs["block"])
    receiver = WeightReceiver(dst.causal_lm)
    for version, entries in chunks:
        receiver.apply(entries, version)
    got = receiver.finish(7)
    assert receiver.version == 7 and got.bytes == total
    want = parameters_of(src.causal_lm)
    for name, p in parameters_of(dst.causal_lm).items():
        assert torch.equal(p, want[name]), name


@pytest.mark.parametrize("split_large", [True, False])
def test_chunks_feed_torch_engine_update_weights(tiny_model_dirs, split_large):
    src = perturbed_policy(tiny_model_dirs["block"], seed=1)
    engine = TorchEngine(load_policy(tiny_model_dirs["block"]))
    learner = Learner(src, LearnerConfig())
    # split_large: tensors over the bucket arrive as row slices; otherwise oversized tensors travel alone.
    chunks = list(learner.weight_buckets(20_000, version=3, split_large=split_large))
    assert any("@" in name for _, entries in chunks for name, _ in entries) == split_large
    for version, entries in chunks:
        engine.update_weights(entries, version, final=False)
    engine.update_weights([], 3, final=True)
    assert engine.policy_version == 3
    want = parameters_of(src.causal_lm)
    for name, p in parameters_of(engine.policy.causal_lm).items():
        assert torch.equal(p, want[name]), name


def test_lora_run_rollout_engine_holds_the_learners_merged_weights(tiny_model_dirs, tmp_path):
    """What the driver does for a LoRA run (LoRA deltas, large tensors sliced) into TorchEngine.update_weights:
    after every sync the engine's weights are exactly the learner's merged weights, and it decodes exactly like
    an engine built from the saved (PEFT-merged) policy."""
    policy = apply_lora(load_policy(tiny_model_dirs["block"]), r=4, alpha=8)
    learner = Learner(policy, LearnerConfig(mu=1, optim=OptimConfig(lr=1e-2)))
    engine = TorchEngine.from_dir(tiny_model_dirs["block"])
    options = {"lora_delta": True, "split_large": True}  # launch.driver_roles.sync_options of a LoRA run
    for round_ in range(2):
        learner.update(_helpers.make_trajectories(policy, 2, prefix=f"e{round_}"))
        # a bucket smaller than the largest LoRA part: parts travel whole (oversized), never sliced
        chunks = list(learner.weight_buckets(1024, **options))
        names = [name for _, entries in chunks for name, _ in entries]
        assert names and all(name.endswith((".lora_A", ".lora_B", ".lora_scaling")) for name in names)
        for version, entries in chunks:
            engine.update_weights(entries, version, final=False)
        engine.update_weights([], learner.updates)
        assert engine.policy_version == learner.updates == round_ + 1
        merged = dict(learner.named_weights(lora_delta=False))
        for name, p in parameters_of(engine.policy.causal_lm).items():
            assert torch.equal(p, merged[name]), (round_, name)
    save_policy(policy, tmp_path / "merged")
    from rollout.sampling import GenerationRequest, SamplingParams

    requests = [GenerationRequest([11, 12, 13 + i], SamplingParams(temperature=1.0, max_tokens=8), seed=i)
                for i in range(3)]
    fresh = TorchEngine.from_dir(tmp_path / "merged").generate(requests)
    for a, b in zip(engine.generate(requests), fresh, strict=True):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def test_receiver_is_strict(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    named = list(merged_weights(policy.causal_lm))
    receiver = WeightReceiver(load_policy(tiny_model_dirs["block"]).causal_lm)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        receiver.apply([("nope", torch.zeros(1))], 1)
    receiver = WeightReceiver(policy.causal_lm)
    name, t = named[0]
    with pytest.raises(ValueError, match="has shape"):
        receiver.apply([(name, t.reshape(-1)[:-1])], 1)
    receiver = WeightReceiver(policy.causal_lm)
    receiver.apply(named[:-1], 1)
    with pytest.raises(ValueError, match="1 parameters never arrived"):
        receiver.finish(1)
    assert receiver.version is None
    receiver.apply(next(iter(chunk_weights(named[:1], 1000))), 2)  # a slice only: the tensor is incomplete
    with pytest.raises(ValueError, match="received only"):
        receiver.finish(2)
    with pytest.raises(ValueError, match="smaller than one row"):
        list(chunk_weights(named, 8))
    receiver.apply(named[:1], 3)
    with pytest.raises(ValueError, match="inside the update to 3"):
        receiver.apply(named[1:2], 4)


def test_lora_delta_sync_reproduces_merged_weights(tiny_model_dirs, tmp_path):
    policy = apply_lora(load_policy(tiny_model_dirs["block"]), r=4, alpha=8)
    learner = Learner(policy, LearnerConfig(mu=1, optim=OptimConfig(lr=1e-2)))
    rollout = load_policy(tiny_model_dirs["block"])
    receiver = WeightReceiver(rollout.causal_lm)
    full_bytes = sum(nbytes(p) for p in rollout.model.parameters())
    for round_ in range(2):  # two syncs: the receiver merges onto the pristine base, no drift
        learner.update(_helpers.make_trajectories(policy, 2, prefix=f"u{round_}"))
        stats = SyncStats()
        for version, entries in learner.weight_buckets(4096, stats=stats):
            assert all(name.endswith((".lora_A", ".lora_B", ".lora_scaling")) for name, _ in entries)
            receiver.apply(entries, version)
        receiver.finish(learner.updates)
        assert stats.bytes < full_bytes / 4
        save_policy(policy, tmp_path / f"merged{round_}")  # PEFT's own merge
        want = parameters_of(load_policy(tmp_path / f"merged{round_}").causal_lm)
        for name, p in parameters_of(rollout.causal_lm).items():
            assert torch.equal(p, want[name]), (round_, name)
        assert any(not torch.equal(p, q) for p, q in zip(rollout.model.parameters(),
                                                           load_policy(tiny_model_dirs["block"]).model.parameters()))
    # The learner's full-weight view (lora_delta=False) is the same merge.
    merged = dict(learner.named_weights(lora_delta=False))
    for name, p in parameters_of(rollout.causal_lm).items():
        assert torch.equal(p, merged[name]), name


def test_stream_weights_counts(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    stats = SyncStats()
    chunks = list(stream_weights(merged_weights(policy.causal_lm), 5, 1 << 16, dtype=torch.bfloat16, stats=stats))
    assert all(t.dtype == torch.bfloat16 for _, e in chunks for _, t in e)
    assert stats.bytes == sum(p.numel() * 2 for p in policy.model.parameters())
    assert set(stats.metrics()) == {"weight_sync_bytes", "weight_sync_chunks", "weight_sync_seconds",
                                    "weight_sync_bytes_per_s"}
