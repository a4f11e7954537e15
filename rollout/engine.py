"""The rollout engine interface (generate / update_weights / sleep / wake) and its torch implementation.

A `RolloutEngine` turns `GenerationRequest`s (token ids, sampling params, a seed each) into `Trajectory`s, takes
new weights in buckets with a version, and can give its memory back between rollouts. `TorchEngine` runs the
diffrl decoders on any torch device; `VLLMEngine` (rollout/vllm_engine.py) serves autoregressive policies.

SGLang is a seam, not a backend: an adapter would subclass `RolloutEngine` (launch `sglang.Engine` on the model
directory, map GenerationRequest to its sampling params with a seed per request, take weights in the same buckets
through `update_weights_from_tensor`) and be added to `make_engine`. It waits until SGLang can feed the learner:
its diffusion path returns token ids only, with no per-token log-probs, no step map (which step unmasked each
token, needed by the trajectory estimator) and argmax sampling only (no temperature, so no group diversity), while
a Trajectory must carry all three.

Memory: TorchEngine sizes the rows it decodes at once from `memory_budget` (rollout/memory_budget.py): each row holds
a KV cache slot of (longest prompt + canvas + one block) columns x kv_bytes_per_token bytes, so at most
budget // slot rows decode together (and never more than max_batch_size); the others wait and, with cached block
decoding, take the slot of a row that finishes (continuous batching). The other decoders run batches of that
many rows. A budget that holds no row at all is an error naming rollout.memory_budget. `memory_metrics()` says
how full the cache was. Between rollouts `sleep()` frees the weights (to host memory from an accelerator, to a
temporary file on CPU) and `wake()` restores them bitwise; generate and update_weights wake a sleeping engine.

Bad input never fails a batch: each request that cannot be decoded comes back as a Trajectory whose
finish_reason is "error: <one line>" and whose response is empty; the others decode normally.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Callable

import torch

from rollout.decoding import cache_columns, decode
from rollout.decoding.kv_cache import CacheUsage, kv_bytes_per_token
from rollout.decoding.state import Row, check_request, error_trajectory
from rollout.memory_budget import format_bytes, parse_memory_budget
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.sleep import WeightSleep
from rollout.trajectory import Trajectory
from rollout.weight_format import SyncStats
from rollout.weight_receiver import WeightReceiver

__all__ = ["RolloutEngine", "TorchEngine", "GenerationRequest", "SamplingParams", "make_engine",
           "iter_buckets", "iter_entries"]

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


class RolloutEngine(abc.ABC):
    """generate(requests) -> trajectories; update_weights(weights, version); sleep() / wake(); release()."""

    policy_version: int = 0

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        """One Trajectory per request, in order."""

    @abc.abstractmethod
    def update_weights(self, weights, version: int, *, final: bool = True) -> None:
        """Load weights given as a mapping, (name, tensor) pairs or an iterable of mappings (buckets), named as
        rollout/weight_format.py says (TorchEngine also takes its row slices and LoRA triples).

        Several calls with final=False stream one update bucket by bucket (e.g. one Ray call per bucket); the call
        with final=True checks that every parameter arrived and sets the policy version.
        """

    @abc.abstractmethod
    def discard_partial_update(self) -> None:
        """Drop a weight update begun (final=False chunks) but never finished, e.g. by a sync attempt that failed
        when a peer died: the retry's first chunk then starts a new update instead of 'arrived twice'. The model
        keeps whatever the abandoned chunks wrote until the retry overwrites it."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free memory held for generation (device caches, offloaded weights); the next generate restores it."""

    def sleep(self) -> int:
        """Give the rollout's memory to a colocated learner (weights offloaded or freed, caches freed); returns the
        bytes freed where known (0 otherwise). The default is release()."""
        self.release()
        return 0

    def wake(self) -> None:
        """Undo sleep(), so that decoding is bitwise what it was before (generate also wakes a sleeping engine)."""

    def memory_metrics(self) -> dict[str, float]:
        """How full the engine's memory was during the last generate (rollout/ metric names); {} if unknown."""
        return {}


def iter_buckets(weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[dict[str, torch.Tensor]]:
    """Normalise the accepted weight formats into dict buckets of at most ~bucket_bytes (one tensor may exceed)."""
    if isinstance(weights, Mapping):
        weights = iter(weights.items())
    iterator = iter(weights)
    first = next(iterator, None)
    if first is None:
        return
    if isinstance(first, Mapping):  # already bucketed by the sender
        for bucket in chain([first], iterator):
            yield dict(bucket)
        return
    bucket, size = {}, 0
    for name, tensor in chain([first], iterator):
        bucket[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = {}, 0
    if bucket:
        yield bucket


def iter_entries(weights) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of any accepted weight format, in order (duplicates kept: the receiver rejects them)."""
    if isinstance(weights, Mapping):
        yield from weights.items()
        return
    for item in weights:
        if isinstance(item, Mapping):
            yield from item.items()
        else:
            yield item


class TorchEngine(RolloutEngine):
    """diffrl's own decoders on a DiffusionPolicy (CPU or GPU).

    kv_cache: "auto" (cached block decoding for block models, exact no-cache decoding for full attention),
    "none" (uncached reference), "block" (cached block decoding), "prefix" / "dual" (Fast-dLLM, full attention).
    memory_budget: None (batches of max_batch_size), a fraction of free memory or bytes (module docstring).
    """

    def __init__(self, policy, *, kv_cache: str = "auto", max_batch_size: int = 64, progress: bool = False,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, memory_budget: float | str | None = None,
                 spill_dir: str | Path | None = None):
        self._init_state(policy, max_batch_size=max_batch_size, progress=progress, bucket_bytes=bucket_bytes,
                         spill_dir=spill_dir)
        self.kv_cache = _resolve_cache(policy.spec, kv_cache)
        if self.kv_cache != "none" and not policy.native:
            raise ValueError(f"engine.kv_cache: {self.kv_cache!r} needs a transformers-native model; a checkpoint "
                             "with its own modelling code decodes with kv_cache='none'")
        self.memory_budget = parse_memory_budget(memory_budget)
        config = policy.causal_lm.config
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or policy.logits_from_hidden(
            torch.zeros(1, policy.hidden_size, device=policy.device, dtype=policy.dtype)).shape[-1])

    def _init_state(self, policy, *, max_batch_size: int, progress: bool, bucket_bytes: int,
                    spill_dir: str | Path | None) -> None:
        """What every torch engine (and its subclasses, e.g. DiffusionGemma's) holds: the policy, the batch limit,
        the weights' sleep state and the weight-sync state."""
        if max_batch_size < 1:
            raise ValueError(f"engine.max_batch_size must be >= 1, got {max_batch_size}")
        self.policy = policy
        self.max_batch_size = max_batch_size
        self._weights = WeightSleep(policy.model, spill_dir)
        self._memory: dict[str, float] = {}
        self.progress = progress
        self.bucket_bytes = bucket_bytes
        self.policy_version = 0
        self._device = policy.device
        self._receiver: WeightReceiver | None = None  # made at the first update_weights
        self.sync_stats: SyncStats | None = None  # receiver-side figures of the last weight update

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, kind: str | None = None, block_size: int | None = None,
                 block_alignment: str | None = None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None, attention_kernel: str = "auto",
                 **options) -> "TorchEngine":
        from rollout.models.loading import load_policy

        if isinstance(dtype, str):  # recipes and Ray calls name the dtype ("bfloat16")
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"engine.dtype: unknown torch dtype {dtype!r}")
            dtype = getattr(torch, dtype)

        policy = load_policy(path, kind=kind, block_size=block_size, block_alignment=block_alignment, dtype=dtype,
                             device=device, trust_remote_code=trust_remote_code,
                             attn_implementation=attn_implementation, attention_kernel=attention_kernel)
        return engine_for(policy, **options) if cls is TorchEngine else cls(policy, **options)

    # --------------------------------------------------------------------------------------------- generate
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        self.wake()
        spec = self.policy.spec
        results: list[Trajectory | None] = [None] * len(requests)
        valid: list[int] = []
        for i, request in enumerate(requests):
            problem = check_request(request, spec, self.max_positions, self.vocab_size)
            if problem is None:
                valid.append(i)
            else:
                results[i] = error_trajectory(request, problem, spec.block_size, self.policy_version)
        total = sum(requests[i].sampling.max_tokens for i in valid)
        bar = _progress_bar(total, self.progress)
        # Same canvas length together (full attention needs it), short prompts together (less padding).
        valid.sort(key=lambda i: (requests[i].sampling.max_tokens, requests[i].prompt_ids.numel()))
        rows = [Row(i, requests[i], spec, self._device) for i in valid]
        usage = CacheUsage()
        budget = self.memory_budget.resolve(self._device) if self.memory_budget is not None and rows else 0
        row_bytes = kv_bytes_per_token(self.policy.causal_lm.config, self.policy.dtype) * cache_columns(spec, rows)
        slots = self._slots(budget, row_bytes) if rows else 0
        continuous = self.kv_cache == "block"  # rows that finish hand their slot over to waiting rows
        try:
            for group in ([rows] if continuous and rows else
                          _groups(rows, slots, same_length=not spec.is_block)):
                if self.kv_cache == "none":  # no cache: what is in use is the rows of each batch
                    usage.record(len(group))
                with torch.inference_mode():
                    decode(self.policy, group, self.kv_cache, on_step=bar.update if bar else None,
                           slots=slots if continuous else None, usage=usage)
                for row in group:
                    results[row.index] = row.trajectory(self.policy_version, self.kv_cache)
        finally:
            if bar is not None:
                bar.close()
        self._memory = _memory_metrics(usage, budget, row_bytes, slots)
        return results  # type: ignore[return-value]

    def _slots(self, budget: int, row_bytes: int) -> int:
        """Rows decoding at once: max_batch_size, fewer when the memory budget holds fewer cache slots."""
        if self.memory_budget is None:
            return self.max_batch_size
        if budget < row_bytes:
            raise ValueError(f"rollout.memory_budget: {self.memory_budget.describe()} = {format_bytes(budget)} "
                             f"holds no request (one needs {format_bytes(row_bytes)} of KV cache)")
        return min(self.max_batch_size, budget // row_bytes)

    def memory_metrics(self) -> dict[str, float]:
        return dict(self._memory)

    # --------------------------------------------------------------------------------------------- weights
    def update_weights(self, weights, version: int, *, final: bool = True, strict: bool = True) -> None:
        """Apply weights in the wire format of rollout/weight_format.py (full tensors, row slices, LoRA triples)
        with a WeightReceiver kept for the engine's life (it holds the pristine base LoRA deltas merge onto)."""
        self.wake()
        if self._receiver is None:
            self._receiver = WeightReceiver(self.policy.causal_lm)
        self._receiver.apply(iter_entries(weights), version)
        if final:
            self.sync_stats = self._receiver.finish(version, strict=strict)
            self.policy_version = int(version)

    def discard_partial_update(self) -> None:
        if self._receiver is not None:
            self._receiver.discard()

    # --------------------------------------------------------------------------------------------- memory
    def release(self) -> None:
        """Generation keeps no state between calls (the KV cache lives for one generate): release = sleep."""
        self.sleep()

    def sleep(self) -> int:
        """Free the weights (accelerator: to host memory; CPU: to a temporary file) and the allocator's cached
        blocks; returns the bytes freed. The KV cache is already gone (it lives for one generate call)."""
        return self._weights.sleep()

    def wake(self) -> None:
        self._weights.wake()

    @property
    def asleep(self) -> bool:
        return self._weights.asleep

    def resident_weight_bytes(self) -> int:
        """Bytes the policy's weights hold on their device now (0 while asleep)."""
        return self._weights.resident_bytes()


def engine_for(policy, **options) -> TorchEngine:
    """The torch engine that decodes `policy`: TorchEngine, or a family's own (DiffusionGemma's sampler)."""
    if policy.spec.kind == "diffusion_gemma":
        from rollout.models.families.diffusion_gemma_engine import DiffusionGemmaEngine

        return DiffusionGemmaEngine(policy, **options)
    return TorchEngine(policy, **options)


def make_engine(name: str, model_dir: str | Path, **options) -> RolloutEngine:
    """Registry of engine backends by name: "torch", "vllm" (SGLang: see the module docstring)."""
    if name == "torch":
        return TorchEngine.from_dir(model_dir, **options)
    if name == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **options)
    raise ValueError(f"rollout.engine: unknown engine {name!r} (expected torch or vllm)")


def _resolve_cache(spec, kv_cache: str) -> str:
    allowed = ("block", "none") if spec.is_block else ("none", "prefix", "dual")
    if kv_cache == "auto":
        return "block" if spec.is_block else "none"
    if kv_cache not in allowed:
        raise ValueError(f"engine.kv_cache: {kv_cache!r} does not apply to {spec.attention} attention "
                         f"(expected auto or one of {allowed})")
    return kv_cache


def _groups(rows: list[Row], size: int, same_length: bool) -> Iterator[list[Row]]:
    group: list[Row] = []
    for row in rows:
        if group and (len(group) == size or (same_length and row.params.max_tokens != group[0].params.max_tokens)):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _memory_metrics(usage: CacheUsage, budget: int, row_bytes: int, slots: int) -> dict[str, float]:
    """rollout/cache_*: rows in use per forward (peak, mean), what their slots hold in bytes and as a fraction of
    the budget (of the allocated cache when there is no budget), and the cache allocated."""
    whole = budget or usage.allocated_bytes
    fill = (lambda rows: rows * row_bytes / whole) if whole else (lambda rows: 0.0)
    return {"rollout/memory_budget_bytes": float(budget), "rollout/cache_slots": float(slots),
            "rollout/cache_allocated_bytes": float(usage.allocated_bytes),
            "rollout/cache_rows_peak": float(usage.peak_rows), "rollout/cache_rows_mean": usage.mean_rows,
            "rollout/cache_bytes_peak": float(usage.peak_rows * row_bytes),
            "rollout/cache_bytes_mean": usage.mean_rows * row_bytes,
            "rollout/cache_fill_peak": fill(usage.peak_rows), "rollout/cache_fill_mean": fill(usage.mean_rows)}


def _progress_bar(total: int, enabled: bool) -> Callable | None:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="rollout", unit="tok")
