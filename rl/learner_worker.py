"""Thin Ray wrapper: a group of `LearnerWorker` actors, one `Learner` per rank.

    group = LearnerGroup(partial(load_policy, "ckpt/"), config, num_workers=2)   # backend deepspeed for > 1
    files = group.save_state(dir) / group.load_state(dir) / group.save_policy(dir)   # checkpoints: each rank
                                                    # writes/reads its own shard in dir (rl.learner_shards); the
                                                    # driver gets file entries and the layout, never tensors
    metrics = group.update(trajectories)            # every rank gets the whole batch (one object), takes its shard
    push_weights(group.weight_chunks(64 << 20), rollout_workers, version)   # rl.weight_sync: one Ray object per
                                                    # chunk (version, [(name, tensor), ...]), a bounded number in flight
    group.shutdown()

Ranks join a torch.distributed group (gloo on CPU, nccl on GPU) at tcp://master_addr:port: rank 0 reports its
node's address and a port free there (`rendezvous`), so ranks on other nodes reach it; a caller may name the address.
Each rank resolves its device inside its actor (rollout.devices.actor_device: the GPU Ray assigned, else the CPU)
and calls `policy_fn(device=...)` (and ref_fn / value_fn) with it.
Every rank computes the same plan from the same batch and keeps only its share (rl.learner_batch), and the loss
normalisers are all-reduced, so N ranks give the single-process update. Building blocks are passed as functions
(`policy_fn`, `ref_fn`, `value_fn`) so each actor loads its own copy where it runs; nothing here imports Ray
until a group is made.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rl.learner import Learner, LearnerConfig
from rl.weight_sync import SYNC_MAX_INFLIGHT


class LearnerWorker:
    """One rank. Plain class: `LearnerGroup` turns it into a Ray actor; tests may drive it directly."""

    def __init__(self, rank: int, world_size: int, policy_fn: Callable, config: LearnerConfig, *,
                 ref_fn: Callable | None = None, value_fn: Callable | None = None, num_threads: int | None = None,
                 device: str = "auto"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        self.requested_device = device  # resources.device; resolved in setup(), inside the actor
        self.device: torch.device | None = None
        self.policy_fn, self.config, self.ref_fn, self.value_fn = policy_fn, config, ref_fn, value_fn
        self.learner: Learner | None = None
        self.last_sync: dict[str, float] = {}
        self._sync_store = None  # rank 0: the TCPStore weight-sync groups meet at (rl.collective_sync)
        self._sync_member = None
        self._ipc = self._ipc_named = None  # rank 0, colocated CUDA IPC sync: its items and its weights walk

    def free_port(self) -> int:
        from rl.learner_backend import free_port

        return free_port()

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address as Ray knows it, a port free on it): where the other ranks meet rank 0."""
        import ray

        from rl.learner_backend import free_port

        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    def setup(self, master_addr: str, port: int) -> int:
        """Join the process group (when world_size > 1 or DeepSpeed) and build the Learner; returns the rank."""
        from rollout.devices import actor_device

        self.device = actor_device(self.requested_device)
        if self.world_size > 1 or self.config.backend == "deepspeed":
            from rl.learner_backend import init_distributed

            init_distributed(self.rank, self.world_size, port, master_addr,
                             backend="nccl" if self.device.type == "cuda" else "gloo")
        policy = self.policy_fn(device=self.device)
        ref = self.ref_fn(device=self.device) if self.ref_fn else None
        value = self.value_fn(device=self.device) if self.value_fn else None
        self.learner = Learner(policy, self.config, ref_policy=ref, value_policy=value)
        return self.rank

    def node(self) -> dict[str, str | None]:
        """The Ray node this rank runs on (rollout.devices.actor_node)."""
        from rollout.devices import actor_node

        return actor_node()

    def placement(self) -> dict[str, object]:
        """Where this rank computes: its Ray node, the chosen device and the devices of the policy, the reference
        model and the value model (trunk and head) as built."""
        from rollout.devices import actor_node, assigned_gpu_ids, tensor_devices

        ln = self.learner
        ref = ln.ref_policy.model if ln.ref_policy is not None else None
        value = [m for m in (ln.value_head, ln.value_policy.model if ln.value_policy is not None else None)
                 if m is not None]
        return {**actor_node(), "device": str(self.device), "gpu_ids": assigned_gpu_ids(),
                "policy": tensor_devices(ln.policy.model),
                "dtype": str(ln.policy.dtype).removeprefix("torch."),
                "reference": tensor_devices(ref) if ref is not None else None,
                "value": tensor_devices(*value) if value else None}

    def update(self, samples) -> dict[str, float]:
        """Learner.update, plus (rank 0, which sends them) the sender-side figures of the last weight sync
        (weight_sync_bytes, _chunks, _seconds, _bytes_per_s: time spent producing chunks, CPU copies included) so
        the driver logs them. Ranks merge by Learner.METRIC_MERGE; a metric only rank 0 reports is its own."""
        metrics = self.learner.update(samples)
        if self.rank == 0:
            metrics.update(self.last_sync)
        return metrics

    def weight_chunks(self, bucket_bytes: int, kwargs: dict) -> Iterator:
        """Rank 0 yields the chunks; the other ranks walk the same weights (ZeRO-3 gathers are collective)."""
        from rl.weight_sync import SyncStats

        if self.rank != 0:  # no host copies here: only the gathers
            from rl.collective_sync import walk_gathers

            walk_gathers(self.learner, kwargs.get("lora_delta"))
            return
        stats = SyncStats()
        yield from self.learner.weight_buckets(bucket_bytes, stats=stats, **kwargs)
        self.last_sync = stats.metrics()

    def sync_endpoint(self) -> tuple[str, int]:
        """Rank 0: (host, port) of the TCPStore weight-sync groups form at (served for this actor's life)."""
        from rollout.weight_collective import GroupMember, SyncStore

        if self.rank != 0:
            raise RuntimeError("weight sync: only learner rank 0 serves the sync group's store")
        if self._sync_store is None:
            self._sync_store = SyncStore()
            self._sync_member = GroupMember(self._sync_store.store)
        return self._sync_store.host, self._sync_store.port

    def send_weights(self, spec, bucket_bytes: int, version: int, kwargs: dict) -> dict[str, float]:
        """Rank 0 broadcasts the weights to sync group `spec` (rollout/weight_collective.py); the other ranks only
        take part in the ZeRO-3 gathers. Returns rank 0's sender figures (also logged with the next update)."""
        from rl.collective_sync import send_over_group, walk_gathers

        if self.rank != 0:
            walk_gathers(self.learner, kwargs.get("lora_delta"))
            return {}
        if self._sync_member is None:
            raise RuntimeError("weight sync: send_weights before sync_endpoint")
        self.last_sync = send_over_group(self.learner, self._sync_member, spec, version, bucket_bytes, **kwargs)
        return dict(self.last_sync)

    def ipc_open(self, bucket_bytes: int, version: int, kwargs: dict) -> None:
        """Rank 0, colocated on one GPU: start a CUDA IPC sync (rollout/weight_ipc.py); ipc_next yields its items.
        The other ranks call walk_gathers meanwhile (ZeRO-3)."""
        from rl.weight_sync import plan_pieces
        from rollout.weight_collective import ALIGN
        from rollout.weight_ipc import ipc_buckets

        from rl.collective_sync import finish_gathers

        unfinished = self._ipc_named
        if unfinished is not None:  # a sync that failed mid-way: end its gathers with the other ranks' walks first
            self._ipc = self._ipc_named = None
            finish_gathers(unfinished)
        lora_delta = kwargs.pop("lora_delta", None)
        self._ipc_named = self.learner.named_weights(lora_delta)
        pieces = plan_pieces(self._ipc_named, bucket_bytes, align=ALIGN, **kwargs)
        self._ipc = ipc_buckets(pieces, version, bucket_bytes, self.learner.device)

    def ipc_next(self) -> dict | None:
        """The next bucket's IPC item (valid until the next call), None at the end."""
        item = next(self._ipc, None)
        if item is None:
            self._ipc = self._ipc_named = None
        return item

    def walk_gathers(self, kwargs: dict) -> None:
        from rl.collective_sync import walk_gathers

        walk_gathers(self.learner, kwargs.get("lora_delta"))

    def save_state(self, folder: str) -> dict[str, dict[str, Any]]:
        """This rank's shard into folder (rl.learner_shards); returns manifest entries only (no tensors)."""
        from rl.learner_shards import save_rank_shard

        return save_rank_shard(self.learner, folder, self.rank, self.world_size)

    def load_state(self, folder: str) -> None:
        from rl.learner_shards import load_rank_shard

        load_rank_shard(self.learner, folder, self.rank, self.world_size)

    def load_legacy_state(self, path: str) -> None:
        from rl.learner_shards import load_legacy_state

        load_legacy_state(self.learner, path, self.world_size)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Merged plain-named weights (rank 0 returns them; for tests and small models)."""
        weights = {k: v.detach().cpu().clone() for k, v in self.learner.named_weights(lora_delta=False)}
        return weights if self.rank == 0 else {}

    def save_policy(self, out_dir: str) -> str | None:
        """HF directory of the policy (LoRA merged), written by rank 0; under ZeRO-3 every rank takes part in
        gathering the partitioned weights."""
        from rollout.models.loading import save_policy

        policy = self.learner.policy
        with self.learner.backend.gathered(policy.model.parameters()):
            return str(save_policy(policy, out_dir)) if self.rank == 0 else None


def _get_all(refs: list) -> list:
    """ray.get of every rank's call; a failure is re-raised as the rank's own one-line error (a rank whose peer
    failed reports PeerShardError: the peer's error, which names the file, wins)."""
    import ray

    from rl.learner_shards import PeerShardError
    from rollout.errors import OneLineError

    results, errors = [], []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            errors.append(cause if isinstance(cause, OneLineError) else err)
    if errors:
        raise min(errors, key=lambda e: isinstance(e, PeerShardError)) from None
    return results


def merge_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One value per metric from every rank's: the rule Learner.METRIC_MERGE names (default: the mean over the
    ranks that report it)."""
    out: dict[str, float] = {}
    for key in per_rank[0]:
        values = [m[key] for m in per_rank if key in m]
        rule = Learner.METRIC_MERGE.get(key, "mean")
        if rule == "sum":
            out[key] = float(sum(values))
        elif rule == "rank0":
            out[key] = float(per_rank[0][key])
        elif rule == "max":
            out[key] = float(max(values))
        else:
            out[key] = float(sum(values) / len(values))
    return out


class LearnerGroup:
    """N LearnerWorker actors (torch backend: N = 1; deepspeed: any N) driven as one learner."""

    def __init__(self, policy_fn: Callable, config: LearnerConfig, *, num_workers: int = 1,
                 ref_fn: Callable | None = None, value_fn: Callable | None = None, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, master_addr: str | None = None, setup_timeout_s: float = 600,
                 actor_options: list[dict] | None = None, device: str = "auto"):
        """actor_options: extra Ray actor options per rank (e.g. the driver's placement-group scheduling).
        master_addr: None -> rank 0's node address (LearnerWorker.rendezvous). device: resources.device, resolved
        by each rank in its actor."""
        import ray

        if num_workers < 1:
            raise ValueError(f"learner.num_workers must be >= 1, got {num_workers}")
        if num_workers > 1 and config.backend != "deepspeed":
            raise ValueError("learner.num_workers > 1 needs learner.backend 'deepspeed'")
        actor = ray.remote(LearnerWorker)
        threads = max(1, int(num_cpus_per_worker))
        self.workers = [
            actor.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
                          **(actor_options[rank] if actor_options else {})).remote(
                rank, num_workers, policy_fn, config, ref_fn=ref_fn, value_fn=value_fn, num_threads=threads,
                device=device)
            for rank in range(num_workers)
        ]
        if master_addr is None:
            master_addr, port = ray.get(self.workers[0].rendezvous.remote())
        else:
            port = ray.get(self.workers[0].free_port.remote())
        self.master_addr = master_addr
        ray.get([w.setup.remote(master_addr, port) for w in self.workers], timeout=setup_timeout_s)
        self.config = config

    def update(self, samples) -> dict[str, float]:
        import ray

        batch = ray.put(list(samples))
        return merge_metrics(ray.get([w.update.remote(batch) for w in self.workers]))

    def weight_chunks(self, bucket_bytes: int, *, max_ahead: int = SYNC_MAX_INFLIGHT, **kwargs) -> Iterator:
        """ObjectRefs of `(version, entries)` chunks, in order, as rank 0 produces them (a streaming generator that
        runs at most `max_ahead` chunks ahead of the caller: with push_weights' bound, the object store holds a
        bounded number of chunks)."""
        streams = [w.weight_chunks.options(num_returns="streaming", _generator_backpressure_num_objects=max_ahead
                                           ).remote(bucket_bytes, kwargs)
                   for w in self.workers]
        yield from streams[0]
        for other in streams[1:]:  # the other ranks only took part in gathers; wait for them to finish
            for _ in other:
                pass

    def sync_endpoint(self) -> tuple[str, int]:
        """(host, port) where weight-sync groups form (learner rank 0's TCPStore)."""
        import ray

        return ray.get(self.workers[0].sync_endpoint.remote())

    def send_weights(self, spec, bucket_bytes: int, version: int, **kwargs) -> list:
        """Start one collective weight sync on every rank (rank 0 sends, the others gather); returns the ObjectRefs
        to wait on together with the receivers' (rank 0's first: its sender figures)."""
        return [w.send_weights.remote(spec, bucket_bytes, version, kwargs) for w in self.workers]

    def save_state(self, folder: str):
        """Every rank writes its shard into folder (a path all ranks see, inside the unpublished checkpoint);
        returns rl.checkpoint.WrittenFiles: the ranks' manifest entries and the layout (plain types only)."""
        from rl.checkpoint import WrittenFiles
        from rl.learner_shards import LAYOUT_FILE

        files: dict[str, dict[str, Any]] = {}
        for share in _get_all([w.save_state.remote(folder) for w in self.workers]):
            files.update(share)
        layout = json.loads((Path(folder) / LAYOUT_FILE).read_text())
        return WrittenFiles(files=files, meta=layout)

    def load_state(self, folder: str) -> None:
        """Every rank loads its own shard from folder, once its layout matches this group's."""
        from rl.learner_shards import check_layout

        check_layout(folder, world_size=len(self.workers), backend=self.config.backend,
                     zero_stage=self.config.zero_stage)
        _get_all([w.load_state.remote(folder) for w in self.workers])

    def load_legacy_state(self, path: str) -> None:
        """A format-1 checkpoint's learner.pt (rl.checkpoint): read by the one torch rank it fits."""
        _get_all([w.load_legacy_state.remote(path) for w in self.workers])

    def policy_state(self) -> dict[str, torch.Tensor]:
        import ray

        return ray.get([w.policy_state.remote() for w in self.workers])[0]

    def nodes(self) -> list[dict[str, str | None]]:
        """Every rank's Ray node (LearnerWorker.node), in rank order."""
        import ray

        return ray.get([w.node.remote() for w in self.workers])

    def placement(self) -> list[dict[str, object]]:
        """Every rank's LearnerWorker.placement(), in rank order."""
        import ray

        return ray.get([w.placement.remote() for w in self.workers])

    def save_policy(self, out_dir: str) -> str:
        import ray

        return ray.get([w.save_policy.remote(out_dir) for w in self.workers])[0]

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
