"""Weight sync over a stateless gloo group (rollout/weight_collective.py, rl/collective_sync.py), in one process:
the learner sends from the test thread, two receivers (TorchEngines) take part from threads. Bitwise equality
after sync (full weights with row slices, LoRA deltas over repeated syncs), at most two bucket buffers, ZeRO-3's
module-by-module gathers (a recording fake), a bad entry that fails one update without breaking the group.
Ray actors (learner + two RolloutWorker actors, ZeRO-3 with 2 ranks): tests/rl/test_collective_sync_ray.py."""
from __future__ import annotations

import contextlib
import importlib.util
import threading
from pathlib import Path

import torch

from rl.collective_sync import send_over_group
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.weight_sync import layered_weights, merged_weights, plan_pieces
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.models.lora import apply_lora
from rollout.weight_collective import ALIGN, GroupMember, GroupSpec, SyncStore, new_group_id, receive_update
from tests.rl.weight_helpers import parameters_of, perturbed_policy

_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


class _Side:
    """The sync group's members of one test: learner rank 0 (serving the store) and receivers 1..n."""

    def __init__(self, receivers: int):
        self.store = SyncStore("127.0.0.1", timeout_s=30)
        self.sender = GroupMember(self.store.store)
        self.receivers = [GroupMember() for _ in range(receivers)]
        self.spec = self.new_spec()

    def new_spec(self) -> GroupSpec:
        return GroupSpec("127.0.0.1", self.store.port, len(self.receivers) + 1, new_group_id(), timeout_s=30)

    def sync(self, learner, engines, version: int, bucket_bytes: int, **options) -> tuple[dict, list]:
        errors: list = [None] * len(engines)

        def receive(rank: int, engine) -> None:
            try:
                receive_update(self.receivers[rank - 1], self.spec, rank,
                               lambda entries, v: engine.update_weights(entries, v, final=False))
                engine.update_weights([], version, final=True)
            except Exception as err:  # reported to the test thread, which asserts on it
                errors[rank - 1] = err

        threads = [threading.Thread(target=receive, args=(rank, e)) for rank, e in enumerate(engines, 1)]
        for t in threads:
            t.start()
        try:
            metrics = send_over_group(learner, self.sender, self.spec, version, bucket_bytes, **options)
        finally:
            for t in threads:
                t.join(timeout=60)
        return metrics, errors


def test_two_receivers_hold_the_learners_weights_bitwise(tiny_model_dirs):
    path = tiny_model_dirs["block"]
    learner = Learner(perturbed_policy(path), LearnerConfig())
    engines = [TorchEngine.from_dir(path) for _ in range(2)]
    side = _Side(2)
    total = sum(p.numel() * p.element_size() for p in learner.policy.model.parameters())
    metrics, errors = side.sync(learner, engines, 5, 20_000)  # smaller than the embeddings: row slices
    assert errors == [None, None]
    assert metrics["weight_sync_bytes"] == total and metrics["weight_sync_chunks"] >= total // 20_000
    assert metrics["weight_sync_peak_buffers"] == 2  # bounded in flight (max_inflight 2), reused after
    want = parameters_of(learner.policy.causal_lm)
    for engine in engines:
        assert engine.policy_version == 5
        got = parameters_of(engine.policy.causal_lm)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # Same group again (no new rendezvous) after the learner's weights changed.
    with torch.no_grad():
        for p in learner.policy.model.parameters():
            p.mul_(1.5)
    group = side.sender.group
    _, errors = side.sync(learner, engines, 6, 1 << 20, max_inflight=1)
    assert errors == [None, None] and side.sender.group is group
    want = parameters_of(learner.policy.causal_lm)
    for engine in engines:
        assert engine.policy_version == 6
        assert all(torch.equal(p, want[n]) for n, p in parameters_of(engine.policy.causal_lm).items())


def test_lora_delta_sync_matches_the_learners_merge_over_repeated_syncs(tiny_model_dirs):
    path = tiny_model_dirs["block"]
    policy = apply_lora(load_policy(path), r=4, alpha=8)
    learner = Learner(policy, LearnerConfig(mu=1, optim=OptimConfig(lr=1e-2)))
    engines = [TorchEngine.from_dir(path) for _ in range(2)]
    side = _Side(2)
    full = sum(p.numel() * p.element_size() for p in engines[0].policy.model.parameters())
    for round_ in range(2):  # the second merge starts from the pristine base again: no drift
        learner.update(_helpers.make_trajectories(policy, 2, prefix=f"c{round_}"))
        metrics, errors = side.sync(learner, engines, learner.updates, 4096, lora_delta=True)
        assert errors == [None, None] and metrics["weight_sync_bytes"] < full / 4
        merged = dict(learner.named_weights(lora_delta=False))
        for engine in engines:
            assert engine.policy_version == round_ + 1
            for name, p in parameters_of(engine.policy.causal_lm).items():
                assert torch.equal(p, merged[name]), (round_, name)
    base = engines[0]._receiver._base
    assert base and all(t.device.type == "cpu" for t in base.values())


def test_a_bad_entry_fails_that_update_and_the_group_stays_usable(tiny_model_dirs, tmp_path):
    from rollout.models.tiny import make_tiny_policy

    path = tiny_model_dirs["block"]
    learner = Learner(perturbed_policy(path, seed=2), LearnerConfig())
    other = TorchEngine.from_dir(make_tiny_policy("block", tmp_path / "wide", seed=1, hidden_size=48))  # shapes differ
    engine = TorchEngine.from_dir(path)
    side = _Side(2)
    _, errors = side.sync(learner, [engine, other], 1, 1 << 16)
    assert errors[0] is None and isinstance(errors[1], ValueError) and other.policy_version == 0
    group = side.sender.group
    _, errors = side.sync(learner, [engine, TorchEngine.from_dir(path)], 2, 1 << 16)
    assert errors == [None, None] and side.sender.group is group and engine.policy_version == 2


def test_plan_pieces_align_and_respect_the_bucket(tiny_model_dirs):
    named = list(merged_weights(load_policy(tiny_model_dirs["block"]).causal_lm))
    bucket, size, rows = 20_000, 0, {}
    for piece in plan_pieces(named, bucket, align=ALIGN):
        if piece is None:
            size = 0
            continue
        name, view, _ = piece
        size += -(-view.numel() * view.element_size() // ALIGN) * ALIGN
        assert size <= bucket, name
        rows.setdefault(name.split("@")[0], []).append(view)
    for name, tensor in named:  # every row of every tensor, exactly once, in order
        assert torch.equal(torch.cat(rows[name]) if len(rows[name]) > 1 else rows[name][0], tensor), name


def test_zero3_gathers_one_module_at_a_time_and_other_ranks_copy_nothing(tiny_model_dirs):
    """layered_weights with a recording `gathered`: never two units open at once, every parameter gathered once,
    a LoRA layer (base weight and adapters) in one gather; emit=False yields nothing but takes every gather."""
    model = apply_lora(load_policy(tiny_model_dirs["block"]), r=2, alpha=4).causal_lm
    opened: list[list[torch.nn.Parameter]] = []
    depth = [0]

    @contextlib.contextmanager
    def gathered(params):
        assert depth[0] == 0, "two gathers open at once"
        depth[0] += 1
        opened.append(list(params))
        yield
        depth[0] -= 1

    entries = list(layered_weights(model, gathered, lora=False))
    assert [n for n, _ in entries] == [n for n, _ in merged_weights(model)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(entries, merged_weights(model), strict=True))
    every = [id(p) for p in model.parameters()]
    assert sorted(id(p) for g in opened for p in g) == sorted(every)
    assert max(len(g) for g in opened) <= 5  # one module's own tensors (a LoRA linear: W, b?, A, B)
    count = len(opened)
    opened.clear()
    assert list(layered_weights(model, gathered, lora=True, emit=False)) == [] and len(opened) == count


def test_transport_choice_and_ipc_refuses_cpu(tiny_model_dirs):
    import pytest

    from launch.driver_roles import weight_sync_transport
    from launch.driver_setup import SetupError
    from rollout.weight_ipc import ipc_buckets

    assert weight_sync_transport("auto", "torch") == "collective"
    assert weight_sync_transport("auto", "vllm") == "object_store"
    assert weight_sync_transport("object_store", "torch") == "object_store"
    with pytest.raises(SetupError, match="rollout.weight_sync: 'collective' needs rollout.engine 'torch'"):
        weight_sync_transport("collective", "vllm")
    # Colocated on GPUs: NCCL refuses two ranks on one GPU -> IPC for one worker on learner rank 0's GPU.
    assert weight_sync_transport("auto", "torch", gpus=True, colocated=True, shares_learner_gpu=True) == "ipc"
    assert weight_sync_transport("auto", "torch", gpus=True, colocated=True) == "object_store"
    assert weight_sync_transport("auto", "torch", gpus=True) == "collective"
    with pytest.raises(SetupError, match="'collective' over NCCL cannot put two ranks on one GPU"):
        weight_sync_transport("collective", "torch", gpus=True, colocated=True)
    with pytest.raises(SetupError, match="'ipc' .* needs GPUs"):
        weight_sync_transport("ipc", "torch", colocated=True, shares_learner_gpu=True)
    named = list(merged_weights(load_policy(tiny_model_dirs["block"]).causal_lm))
    with pytest.raises(ValueError, match="'ipc' needs CUDA tensors"):
        next(ipc_buckets(plan_pieces(named, 1 << 16, align=ALIGN), 1, 1 << 16, "cpu"))


_DYING_RECEIVER = """
import os, sys
from rollout.weight_collective import GroupMember, GroupSpec, receive_update
spec = GroupSpec(sys.argv[1], int(sys.argv[2]), 3, sys.argv[3], timeout_s=30)
receive_update(GroupMember(), spec, 2, lambda entries, version: os._exit(1))  # dies holding the first bucket
"""


def test_a_receiver_dying_mid_sync_fails_the_others_quickly(tiny_model_dirs, tmp_path):
    """A member process that dies mid-broadcast closes its sockets: the sender and the live receiver fail well
    before the group timeout (30 s here), so the driver can form a new group and retry."""
    import os
    import subprocess
    import sys
    import time

    import pytest

    path = tiny_model_dirs["block"]
    learner = Learner(perturbed_policy(path), LearnerConfig())
    side = _Side(2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    dying = subprocess.Popen([sys.executable, "-c", _DYING_RECEIVER, "127.0.0.1", str(side.store.port),
                              side.spec.group_id], env=env)
    errors: list = []

    def live() -> None:
        try:
            receive_update(side.receivers[0], side.spec, 1, lambda entries, version: None)
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=live)
    thread.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        send_over_group(learner, side.sender, side.spec, 1, 4096)  # many small buckets: still sending at death
    thread.join(timeout=60)
    assert dying.wait(timeout=30) == 1
    assert time.monotonic() - start < 20 and len(errors) == 1
    assert side.sender.group is None and side.receivers[0].group is None  # both dropped: a new group forms next


class _RecordingGroup:
    """A stand-in for a ProcessGroupNCCL: records the device of every tensor broadcast through it."""

    def __init__(self):
        self.devices: list[str] = []

    def broadcast(self, tensor, root):
        assert root == 0
        self.devices.append(str(tensor.device))

        class _Done:
            def wait(self):
                return True

        return _Done()


def test_an_nccl_group_gets_the_timeout_and_device_tensors_only(tiny_model_dirs, monkeypatch):
    """What a CPU machine can check of the NCCL path: the group is built with the spec's timeout (NCCL's own default
    is 10 min of waiting on a dead peer), every tensor the sender broadcasts (sizes, header, buckets) is on the
    learner's device (a CPU tensor in an NCCL collective is an error), never the host; a CPU learner is refused; the
    receiver allocates on its worker's device. `meta` stands for the GPU (tensors with a device but no data)."""
    import datetime
    import types

    import pytest
    import torch.distributed as dist

    import rollout.weight_collective as wc
    from rl.collective_sync import send_over_group
    from rollout.worker import RolloutWorker

    built = []
    monkeypatch.setattr(dist, "ProcessGroupNCCL", lambda *args: built.append(args) or _RecordingGroup(),
                        raising=False)
    store = SyncStore("127.0.0.1", timeout_s=30)
    spec = GroupSpec("127.0.0.1", store.port, 3, new_group_id(), backend="nccl", timeout_s=17)
    member = GroupMember(store.store)
    group = member.get(spec, 0)
    assert len(built) == 1 and built[0][1:] == (0, 3, datetime.timedelta(seconds=17))

    named = [(n, t.detach().to("meta")) for n, t in merged_weights(load_policy(tiny_model_dirs["block"]).causal_lm)]
    learner = types.SimpleNamespace(device=torch.device("meta"), named_weights=lambda lora_delta=None: iter(named))
    metrics = send_over_group(learner, member, spec, 3, 20_000)
    assert metrics["weight_sync_chunks"] > 2 and len(group.devices) == 3 * metrics["weight_sync_chunks"] + 1
    assert set(group.devices) == {"meta"}
    learner.device = torch.device("cpu")
    with pytest.raises(RuntimeError, match="NCCL group needs learner rank 0 on a GPU"):
        send_over_group(learner, GroupMember(store.store), spec, 4, 20_000)

    seen = []
    monkeypatch.setattr(wc, "receive_update", lambda member, spec, rank, apply, device: seen.append(device) or 0)
    worker = RolloutWorker(tiny_model_dirs["block"], device="cpu")
    worker.device = torch.device("meta")  # as if actor_device had chosen the accelerator
    monkeypatch.setattr(worker.engine, "update_weights", lambda *args, **kwargs: None)  # nothing was received
    worker.receive_weights(spec, 1, 0)
    assert seen == [torch.device("meta")]
    worker.device = torch.device("cpu")
    with pytest.raises(RuntimeError, match="NCCL group needs the rollout worker on a GPU"):
        worker.receive_weights(spec, 1, 0)


def test_a_failed_send_still_walks_every_gather_the_other_ranks_wait_in(tiny_model_dirs):
    """Under ZeRO-3 the other learner ranks walk the same module-by-module gathers while rank 0 sends; when a
    receiver dies mid-sync rank 0's send fails, and unless rank 0 walks the rest of its gathers the others wait in
    the next one until the learner group's timeout. Here a group whose 4th broadcast fails stands for the dead
    receiver, and the learner's weights walk is counted."""
    import types

    import pytest

    class _Failing(_RecordingGroup):
        def broadcast(self, tensor, root):
            if len(self.devices) == 3:
                raise RuntimeError("connection reset by peer")
            return super().broadcast(tensor, root)

    named = list(merged_weights(load_policy(tiny_model_dirs["block"]).causal_lm))
    walked = []

    def named_weights(lora_delta=None):
        for name, tensor in named:
            walked.append(name)  # a gather of this module, in step with the other ranks
            yield name, tensor

    group = _Failing()
    member = GroupMember()
    member.get = lambda spec, rank: group
    learner = types.SimpleNamespace(device=torch.device("cpu"), named_weights=named_weights)
    spec = GroupSpec("127.0.0.1", 1, 2, new_group_id())
    with pytest.raises(RuntimeError, match="connection reset"):
        send_over_group(learner, member, spec, 1, 4096)  # small buckets: the failure comes early
    assert len(group.devices) == 3 and walked == [n for n, _ in named]
