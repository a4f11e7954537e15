"""The driver's view of its actors: how each role is built from the recipe, and the rollout pool that survives a
worker dying mid-step.

    pool = RolloutPool(recipe, initial_policy_dir, group, plan)   # N RolloutWorker actors, restarted by Ray
    pool.sync(learner, version)                             # learner -> workers, bucket by bucket
    trajectories = pool.generate(requests)                  # sharded; a dead worker is waited for, re-synced, retried
    learner = make_learner(recipe, group, plan, start_policy_dir=..., initial_policy_dir=...)  # LearnerGroup
    rewards = make_reward_service(specs, base_dir, cpus_free, max_workers=recipe.resources.reward_workers)

Recipe -> component configs (engine options, rl.learner.LearnerConfig) are mapped here, once; SamplingParams in
launch/decoding.py (shared with `diffrl eval`).
"""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Sequence

import torch

from launch.data import shard
from launch.decoding import decode_block
from launch.driver_setup import PlacementPlan, SetupError
from launch.recipe import Recipe
from rollout.errors import one_line
from rollout.sampling import GenerationRequest
from rollout.trajectory import Trajectory

log = logging.getLogger(__name__)

ROLLOUT_MAX_RESTARTS = 3  # Ray restarts a dead rollout worker this many times per run
SYNC_BUCKET_BYTES = 64 * 1024 * 1024


# ------------------------------------------------------------------------------------------- recipe mappings
def _dtype(recipe: Recipe) -> torch.dtype:
    return getattr(torch, recipe.model.dtype)


def engine_options(recipe: Recipe) -> dict[str, Any]:
    """RolloutWorker's keyword options. `device` is the recipe's request ("auto" | "cpu" | "cuda"): the worker
    resolves it inside its actor (rollout.devices.actor_device), where Ray's GPU assignment is known."""
    options = {"engine": recipe.rollout.engine, "kv_cache": recipe.rollout.cache,
               "max_batch_size": recipe.rollout.batch_size, "kind": recipe.model.declared_kind,
               "block_size": decode_block(recipe), "dtype": _dtype(recipe),
               "trust_remote_code": recipe.model.trust_remote_code, "device": recipe.resources.device}
    if recipe.rollout.memory_budget is not None:
        if recipe.rollout.engine != "torch":
            raise ValueError("rollout.memory_budget: sizes the torch engine's KV cache (vLLM sizes its own)")
        options["memory_budget"] = recipe.rollout.memory_budget
    if recipe.model.block_alignment is not None:  # else the checkpoint's own (its diffrl.json, or its kind's)
        options["block_alignment"] = recipe.model.block_alignment
    if recipe.model.attn_implementation is not None:
        options["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.attention_kernel != "auto":
        options["attention_kernel"] = recipe.model.attention_kernel
    return options


def sync_options(*, lora: bool, engine: str) -> dict[str, bool]:
    """How the learner streams weights to the rollout workers. TorchEngine takes the whole wire format (rollout/
    weight_format.py): large tensors as row slices and, for a LoRA policy, only the adapters (merged on the rollout
    side onto its copy of the base, the run's initial policy). Other engines load whole merged tensors."""
    native = engine == "torch"
    return {"lora_delta": native and lora, "split_large": native}


def weight_sync_transport(choice: str, engine: str, *, gpus: bool = False, colocated: bool = False,
                          shares_learner_gpu: bool = False) -> str:
    """rollout.weight_sync -> "collective" (a torch.distributed group from learner rank 0 to the workers: gloo on
    CPU, NCCL on GPU), "ipc" (CUDA IPC handles: every receiver on learner rank 0's GPU) or "object_store" (chunks
    through Ray's object store: engines outside the group). NCCL refuses two ranks on one GPU, so colocated GPU
    placement syncs by IPC when the one rollout worker shares learner rank 0's GPU, else through the object store.
    gpus: learner and rollout actors hold GPUs; shares_learner_gpu: every receiver sits on learner rank 0's."""
    if choice not in ("auto", "collective", "object_store", "ipc"):
        raise SetupError(f"rollout.weight_sync: {choice!r} is not auto, collective, object_store or ipc")
    if choice in ("collective", "ipc") and engine != "torch":
        raise SetupError(f"rollout.weight_sync: {choice!r} needs rollout.engine 'torch' (got {engine!r}); "
                         "use 'object_store' or 'auto'")
    if choice == "ipc" and not (gpus and shares_learner_gpu):
        raise SetupError("rollout.weight_sync: 'ipc' (CUDA IPC handles) needs GPUs and every rollout worker on "
                         "learner rank 0's GPU (colocated placement, one rollout worker)")
    if choice == "collective" and gpus and colocated:
        raise SetupError("rollout.weight_sync: 'collective' over NCCL cannot put two ranks on one GPU (colocated "
                         "placement): use 'ipc' (one rollout worker), 'object_store' or 'auto'")
    if choice != "auto":
        return choice
    if engine != "torch":
        return "object_store"
    if gpus and colocated:
        return "ipc" if shares_learner_gpu else "object_store"
    return "collective"


def learner_config(recipe: Recipe):
    from rl.learner import LearnerConfig, ValueConfig
    from rl.optim import OptimConfig

    alg, ln = recipe.algorithm, recipe.learner
    optim = OptimConfig(lr=ln.lr, betas=tuple(ln.betas), weight_decay=ln.weight_decay, warmup_steps=ln.warmup_steps,
                        schedule=ln.schedule, min_lr_ratio=ln.min_lr_ratio,
                        total_steps=recipe.trainer.total_steps * ln.mu if ln.schedule != "constant" else None)
    vm = getattr(alg, "value_model", None)
    value = None if vm is None else ValueConfig(lr=vm.lr, clip=vm.clip, gamma=vm.gamma, lam=vm.lam, trunk=vm.trunk,
                                               coef=vm.coef)
    reseed = getattr(recipe.estimator, "reseed_per_update", None)
    return LearnerConfig(
        algorithm=alg.name, loss=alg.loss_params(), estimator=recipe.estimator.name,
        estimator_params=recipe.estimator.params(), reseed_per_inner=reseed,
        temperature=recipe.rollout.temperature or 1.0,  # greedy rollouts record untempered log-probs
        optim=optim, grad_clip=ln.grad_clip or None, micro_batch_size=ln.micro_batch_size, grad_accum=ln.grad_accum,
        pack_tokens=ln.pack_tokens, pack_row_tokens=ln.pack_row_tokens,
        mu=ln.mu, reference_model=ln.reference_model, bf16=ln.bf16, offload_reference=ln.offload_reference,
        ref_sync_steps=ln.ref_sync_steps, ref_sync_alpha=ln.ref_sync_alpha, offload_optimizer=ln.offload_optimizer,
        entropy=ln.log_entropy, router_aux_loss_coef=ln.router_aux_loss_coef,
        gradient_checkpointing=recipe.model.gradient_checkpointing, value=value, backend=ln.backend,
        **({"zero_stage": ln.zero_stage} if ln.zero_stage is not None else {}), seed=recipe.seed,
        old_logp="rollout" if recipe.trainer.off_policy == "behaviour" else "recompute",
        fuse_on_policy_old_logp=ln.fuse_on_policy_old_logp)


def load_learner_policy(path: str, kind: str | None, block_size: int | None, dtype: str, trust_remote_code: bool,
                        lora: dict | None, device: str | torch.device = "cpu", seed: int | None = None,
                        block_alignment: str | None = None, attn_implementation: str | None = None,
                        attention_kernel: str = "auto"):
    """Module-level (picklable) policy factory run inside each learner actor; the LearnerWorker passes the device
    it resolved (rollout.devices.actor_device)."""
    from rollout.models.loading import load_policy

    policy = load_policy(path, kind=kind, block_size=block_size, dtype=getattr(torch, dtype), device=device,
                         trust_remote_code=trust_remote_code, block_alignment=block_alignment,
                         attn_implementation=attn_implementation, attention_kernel=attention_kernel)
    if lora is not None:
        from rollout.models.lora import apply_lora

        policy = apply_lora(policy, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                            target_modules=lora["target_modules"], seed=seed)
    return policy


def _policy_fn(recipe: Recipe, path) -> partial:
    lora = recipe.model.lora.model_dump() if recipe.model.lora is not None else None
    return partial(load_learner_policy, str(path), recipe.model.declared_kind, decode_block(recipe),
                   recipe.model.dtype, recipe.model.trust_remote_code, lora, seed=recipe.seed,
                   block_alignment=recipe.model.block_alignment,
                   attn_implementation=recipe.model.attn_implementation,
                   attention_kernel=recipe.model.attention_kernel)


def _strategy(group, bundle: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)


# --------------------------------------------------------------------------------------------------- learner
def make_learner(recipe: Recipe, group, plan: PlacementPlan, *, start_policy_dir, initial_policy_dir):
    """The learner group on its bundles, its policy loaded from `start_policy_dir` (the initial policy, or the
    resumed checkpoint's). The KL reference (when the loss needs one) is `initial_policy_dir`, the run's version-0
    policy, also after a resume; a value model starts from algorithm.value_model.path or a copy of the policy. A
    LoRA learner always starts from the initial policy, its frozen base (and the rollout workers' base for
    LoRA-delta sync): on resume its adapters come from the checkpoint's learner state, not from its merged policy/."""
    from rl.learner_worker import LearnerGroup

    policy_dir = initial_policy_dir if recipe.model.lora is not None else start_policy_dir
    config = learner_config(recipe)
    ref_fn = _policy_fn(recipe, initial_policy_dir) if config.reference_model else None
    vm = getattr(recipe.algorithm, "value_model", None)
    value_fn = _policy_fn(recipe, vm.path) if vm is not None and vm.path else None
    res = plan.learner_resources
    options = [{"scheduling_strategy": _strategy(group, b)} for b in plan.learner_bundles]
    return LearnerGroup(_policy_fn(recipe, policy_dir), config, num_workers=len(plan.learner_bundles),
                        ref_fn=ref_fn, value_fn=value_fn, num_cpus_per_worker=res["num_cpus"],
                        num_gpus_per_worker=res["num_gpus"], actor_options=options, device=recipe.resources.device)


# ---------------------------------------------------------------------------------------------------- rewards
def make_reward_service(specs: list[dict], base_dir, cpus_free: float, *, max_workers: int = 2):
    """Reward workers outside the placement group: up to `max_workers` (resources.reward_workers), one CPU each
    while the cluster has CPUs left, else one zero-CPU worker (the tiny CPU setup, where the group holds every
    core)."""
    from rewards.service import RewardService

    workers, cpus = reward_workers(cpus_free, max_workers)
    return RewardService(specs, num_workers=workers, num_cpus_per_worker=cpus, base_dir=base_dir)


def reward_workers(cpus_free: float, max_workers: int) -> tuple[int, float]:
    """(worker count, CPUs each): min(max_workers, free CPUs) one-CPU workers, or one zero-CPU worker."""
    if max_workers < 1:
        raise ValueError(f"resources.reward_workers: {max_workers} < 1")
    return (int(min(max_workers, cpus_free)), 1.0) if cpus_free >= 1 else (1, 0.0)


# ------------------------------------------------------------------------------------------------ rollout pool
class RolloutPool:
    """RolloutWorker actors; `version` is what every live worker holds. A worker that dies is restarted by Ray
    (max_restarts) from the initial weights: the pool re-syncs it to the current version before retrying."""

    def __init__(self, recipe: Recipe, initial_policy_dir, group, plan: PlacementPlan):
        import ray

        from rollout.worker import RolloutWorker

        res = plan.rollout_resources
        actor = ray.remote(RolloutWorker)
        options = engine_options(recipe)
        self.workers = [
            actor.options(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_restarts=ROLLOUT_MAX_RESTARTS,
                          max_task_retries=0, scheduling_strategy=_strategy(group, b)
                          ).remote(str(initial_policy_dir), **options)
            for b in plan.rollout_bundles
        ]
        ray.get([w.ready.remote() for w in self.workers])
        self.nodes: list[dict | None] = ray.get([w.node.remote() for w in self.workers])  # each worker's Ray node
        self.sync_options = sync_options(lora=recipe.model.lora is not None, engine=recipe.rollout.engine)
        gpus = bool(plan.rollout_resources["num_gpus"] and plan.learner_resources["num_gpus"])
        colocated = bool(set(plan.rollout_bundles) & set(plan.learner_bundles))
        shares = plan.rollout_bundles == [plan.learner_bundles[0]]  # one worker, on learner rank 0's bundle
        self.transport = weight_sync_transport(recipe.rollout.weight_sync, recipe.rollout.engine, gpus=gpus,
                                               colocated=colocated, shares_learner_gpu=shares)
        self.backend = "nccl" if gpus else "gloo"
        self._group = None  # (receiver indices, GroupSpec) of the current sync group; None: form a new one
        self.version = 0  # the workers are built from the run's initial policy (a directory that is never pruned)
        self._learner = None
        self.restarts = 0

    @classmethod
    def of_workers(cls, workers: list, *, transport: str, sync_options: dict, backend: str = "gloo"
                   ) -> "RolloutPool":
        """A pool over actors made elsewhere (tests, benchmarks/weight_sync.py), holding version 0."""
        pool = cls.__new__(cls)
        pool.workers, pool.version, pool._learner, pool.restarts = list(workers), 0, None, 0
        pool.nodes = [None] * len(pool.workers)  # not known: a lost node is not told apart from a slow restart
        pool.transport, pool.sync_options, pool.backend, pool._group = transport, dict(sync_options), backend, None
        return pool

    def sync(self, learner, version: int) -> float:
        """Send the learner's weights (version `version`) to every worker; returns seconds spent. A worker that
        dies meanwhile is waited for and the whole sync repeated (a restarted worker holds the initial weights)."""
        from ray.exceptions import RayActorError

        self._learner = learner
        start = time.perf_counter()
        for attempt in range(ROLLOUT_MAX_RESTARTS + 1):
            try:
                self._send(learner, version, list(range(len(self.workers))))
                break
            except RayActorError as err:
                if attempt == ROLLOUT_MAX_RESTARTS:
                    raise RuntimeError(f"weight sync: rollout workers keep dying ({type(err).__name__})") from None
                log.warning("a rollout worker died during weight sync; waiting for its restart")
                self.restarts += 1
                self._group = None
                for i in range(len(self.workers)):
                    self._wait_ready(i)
                self._discard_partial_updates()
        self.version = version
        return time.perf_counter() - start

    def _discard_partial_updates(self) -> None:
        """Survivors of a failed sync hold part of its update: drop it so the repeated sync starts whole."""
        import ray

        ray.get([w.discard_partial_update.remote() for w in self.workers])

    def _send(self, learner, version: int, indices: list[int]) -> None:
        if self.transport == "collective":
            self._send_collective(learner, version, indices)
            return
        if self.transport == "ipc":
            self._send_ipc(learner, version, indices)
            return
        from rl.weight_sync import push_weights

        push_weights(learner.weight_chunks(SYNC_BUCKET_BYTES, version=version, **self.sync_options),
                     [self.workers[i] for i in indices], version)

    def _group_for(self, learner, indices: list[int]):
        """The sync group of learner rank 0 and the workers `indices` (rank i+1 for the i-th): kept while the same
        workers sync and nothing failed; a new group (new id) after a failure, another member set, or a restart
        (a worker Ray restarted while idle reports a new incarnation)."""
        import ray

        from rollout.weight_collective import GroupSpec, new_group_id

        members = (tuple(indices), tuple(ray.get([self.workers[i].incarnation.remote() for i in indices])))
        if self._group is None or self._group[0] != members:
            host, port = learner.sync_endpoint()
            spec = GroupSpec(host, port, len(indices) + 1, new_group_id(), backend=self.backend)
            self._group = (members, spec)
        return self._group[1]

    def _send_collective(self, learner, version: int, indices: list[int]) -> None:
        """learner.send_weights and every receiver's receive_weights run together; all are waited for before an
        error is raised (a dead worker's RayActorError first: sync() then waits for its restart and retries)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        spec = self._group_for(learner, indices)
        receivers = [self.workers[i].receive_weights.remote(spec, rank, version) for rank, i in enumerate(indices, 1)]
        senders = learner.send_weights(spec, SYNC_BUCKET_BYTES, version, **self.sync_options)
        errors, held = [], []
        for ref in receivers + senders:
            try:
                held.append(ray.get(ref))
            except RayError as err:
                errors.append(err)
        if errors:
            self._group = None  # every member dropped it or will find it gone: the next sync forms a new one
            raise next((e for e in errors if isinstance(e, RayActorError)), errors[0])
        wrong = [v for v in held[:len(receivers)] if v != version]
        if wrong:
            raise RuntimeError(f"weight sync: a rollout worker reports version {wrong[0]} after syncing {version}")

    def _send_ipc(self, learner, version: int, indices: list[int]) -> None:
        """Colocated on one GPU (rollout/weight_ipc.py): learner rank 0 packs one bucket at a time into a CUDA
        buffer, every receiver maps it by IPC handle and applies it, then the next bucket. Not run on CPU."""
        import ray

        rank0, others = learner.workers[0], learner.workers[1:]
        gathers = [w.walk_gathers.remote(dict(self.sync_options)) for w in others]
        ray.get(rank0.ipc_open.remote(SYNC_BUCKET_BYTES, version, dict(self.sync_options)))
        while (item := ray.get(rank0.ipc_next.remote())) is not None:
            ray.get([self.workers[i].receive_ipc_bucket.remote(item) for i in indices])
        ray.get(gathers)
        held = ray.get([self.workers[i].update_weights.remote({}, version, final=True) for i in indices])
        if any(v != version for v in held):
            raise RuntimeError(f"weight sync: a rollout worker reports version {held} after syncing {version}")

    def generate(self, requests: Sequence[GenerationRequest], max_attempts: int = ROLLOUT_MAX_RESTARTS + 1
                 ) -> list[Trajectory]:
        """Requests split evenly over the workers, results in request order."""
        import ray
        from ray.exceptions import RayActorError

        shards = shard(list(requests), len(self.workers))
        pending = {i: self.workers[i].generate.remote(s) for i, s in enumerate(shards) if s}
        results: dict[int, list[Trajectory]] = {}
        attempts = dict.fromkeys(pending, 1)
        while pending:
            i, ref = next(iter(pending.items()))
            try:
                results[i] = ray.get(ref)
                del pending[i]
            except RayActorError as err:
                if attempts[i] >= max_attempts:
                    raise RuntimeError(f"rollout worker {i} died {attempts[i]} times in one step: "
                                       f"{one_line(err, 200)}") from None
                log.warning("rollout worker %d died (%s); waiting for Ray to restart it", i, type(err).__name__)
                self.restarts += 1
                self._revive(i)
                attempts[i] += 1
                pending[i] = self.workers[i].generate.remote(shards[i])
        return [t for i in range(len(shards)) for t in results.get(i, [])]

    def _revive(self, i: int) -> None:
        self._wait_ready(i)
        self._group = None  # the restarted worker is in no group
        if self._learner is not None:  # it came back with the weights it was built from: bring it to `version`
            self._send(self._learner, self.version, [i])

    def _wait_ready(self, i: int, timeout_s: float = 300.0) -> None:
        """Wait for Ray to restart worker i on its node. Its node gone (the worker cannot come back there) ends the
        run at once with launch.cluster_nodes.NodeLostError, without waiting out timeout_s."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from launch.cluster_nodes import (
            NodeLostError,
            actor_roles,
            alive_nodes,
            describe_loss,
        )

        deadline = time.monotonic() + timeout_s
        node = self.nodes[i] or {}
        while True:
            try:
                ray.get(self.workers[i].ready.remote(), timeout=5)
                break
            except (RayActorError, GetTimeoutError):
                if node.get("node_id") and node["node_id"] not in alive_nodes():
                    raise NodeLostError(describe_loss({node["node_id"]: node.get("node_ip") or "?"},
                                                      actor_roles({"rollout": self.nodes}))) from None
                if time.monotonic() > deadline:
                    raise SetupError(f"rollout worker {i}: not back {timeout_s:.0f}s after dying") from None
                time.sleep(0.5)
        if self.nodes[i] is not None:
            self.nodes[i] = ray.get(self.workers[i].node.remote())

    def sleep(self) -> int:
        """Every worker frees its weights and caches (colocated learner update); returns the bytes freed."""
        return sum(self._each("sleep"))

    def wake(self) -> None:
        self._each("wake")

    def _each(self, method: str) -> list:
        """Call `method` on every worker; one that died meanwhile is left to Ray's restart (it comes back awake with
        the initial weights, and the next step's sync, due after every update, brings it to the version)."""
        import ray
        from ray.exceptions import RayActorError

        refs = [getattr(w, method).remote() for w in self.workers]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as err:
                log.warning("rollout worker %d died during %s (%s); Ray restarts it", i, method, type(err).__name__)
        return [x for x in out if x is not None]

    def metrics(self) -> dict[str, float]:
        from rollout.worker import merge_rollout_metrics

        return merge_rollout_metrics(self._each("metrics"))  # a worker that died since it generated: left out

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
