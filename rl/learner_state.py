"""The Learner's weights and checkpoint state: plain-named weights streamed to the rollout side (full merged weights,
or the LoRA adapter triples, rl.weight_sync) and the counters / optimizer / value model / adapter state a resume
reads back (torch.load(weights_only=True)).

A mixin of `rl.learner.Learner` (and so of rl.preference_learner.PreferenceLearner); it reads the host's `policy`,
`backend`, `lora`, `value_head`, `value_policy` and the counters `updates`, `optimizer_steps`, `nan_skipped_total`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from rl.weight_sync import Chunk, SyncStats, layered_weights, stream_weights

STATE_FORMAT = 1


class LearnerStateMixin:
    """Weight export and checkpoint state of a Learner (see the module doc for what it reads of its host)."""

    def named_weights(self, lora_delta: bool | None = None, *,
                      emit: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Plain-named weights for the rollout side: full merged weights, or (training LoRA, lora_delta None/True)
        the adapter triples only (see rl.weight_sync). Under ZeRO-3 every rank must iterate this together: one
        module's parameters are gathered at a time, and ranks that do not send pass emit=False."""
        lora = self.lora if lora_delta is None else bool(lora_delta)
        if lora and not self.lora:
            raise ValueError("named_weights: lora_delta=True but the policy has no LoRA adapters")
        yield from layered_weights(self.policy.causal_lm, self.backend.gathered, lora=lora, emit=emit)

    def weight_buckets(self, bucket_bytes: int, *, version: int | None = None, lora_delta: bool | None = None,
                       dtype: torch.dtype | None = None, split_large: bool = True,
                       stats: SyncStats | None = None) -> Iterator[Chunk]:
        """`(version, [(name, tensor), ...])` chunks of at most bucket_bytes (rl.weight_sync.stream_weights);
        version defaults to the number of updates done."""
        version = self.updates if version is None else version
        return stream_weights(self.named_weights(lora_delta), version, bucket_bytes, dtype=dtype,
                              split_large=split_large, stats=stats)

    def state_dict(self) -> dict[str, Any]:
        """Counters, the backend's state (torch: the optimizer; DeepSpeed: its layout, the rest being in its own
        files, rl.learner_shards), and unless the backend's files hold them, the value model and (LoRA) adapters:
        tensors and plain types only (torch.load(weights_only=True) reads it). Full policy weights are saved apart
        (save_policy, LoRA merged). A LoRA learner resumes on its frozen base (the run's initial policy, never the
        merged checkpoint) with these adapters: the same policy, reference (adapters off) and optimizer state."""
        state = {"format": STATE_FORMAT, "updates": self.updates, "optimizer_steps": self.optimizer_steps,
                 "nan_skipped_total": self.nan_skipped_total, "backend": self.backend.state_dict()}
        if self.ref_syncs:  # a re-synced reference is no longer the initial checkpoint a resume loads it from
            state["ref_syncs"] = self.ref_syncs
            state["reference"] = {k: v.detach().cpu().clone() for k, v in self.ref_policy.model.named_parameters()}
        if self.backend.owns_module_state:  # DeepSpeed's own files hold the adapters and the value model
            return state
        if self.lora:
            state["adapter"] = self._adapter_state()
        if self.value_head is not None:
            state["value_head"] = {k: v.detach().cpu().clone() for k, v in self.value_head.state_dict().items()}
        if self.value_policy is not None:
            state["value_trunk"] = {k: v.detach().cpu().clone() for k, v in self.value_policy.model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"learner state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        self._load_reference(state)
        if self.backend.owns_module_state:  # the module comes with the backend's files (rl.learner_shards)
            self._load_counters(state)
            return
        for key, module in (("value_head", self.value_head),
                            ("value_trunk", self.value_policy.model if self.value_policy else None)):
            if (key in state) != (module is not None):
                raise ValueError(f"learner state: {key} {'missing' if module is not None else 'unexpected'}")
            if module is not None:
                module.load_state_dict(state[key])
        if ("adapter" in state) != self.lora:
            raise ValueError(f"learner state: adapter {'missing' if self.lora else 'unexpected'} (the checkpoint "
                             f"was {'not ' if self.lora else ''}written by a LoRA learner)")
        if self.lora:
            self._load_adapter(state["adapter"])
        self._load_counters(state)

    def _load_reference(self, state: dict[str, Any]) -> None:
        """A re-synced reference's weights (learner.ref_sync_steps), bit for bit."""
        if "reference" not in state:
            self.ref_syncs = 0
            return
        if self.ref_policy is None:
            raise ValueError("learner state: holds a re-synced reference, but this learner has no reference model")
        params = dict(self.ref_policy.model.named_parameters())
        saved = state["reference"]
        odd = sorted(set(params) ^ set(saved))
        if odd:
            raise ValueError(f"learner state: reference tensor {odd[0]!r} is not in both the checkpoint and the model")
        with torch.no_grad():
            for name, p in params.items():
                if tuple(saved[name].shape) != tuple(p.shape):
                    raise ValueError(f"learner state: reference tensor {name!r} has shape {tuple(saved[name].shape)}"
                                     f", the model expects {tuple(p.shape)}")
                p.copy_(saved[name].to(device=p.device, dtype=p.dtype))
        self.ref_syncs = int(state["ref_syncs"])

    def _load_counters(self, state: dict[str, Any]) -> None:
        self.backend.load_state_dict(state["backend"])
        self.updates = int(state["updates"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.nan_skipped_total = int(state["nan_skipped_total"])

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.policy.model.named_parameters() if p.requires_grad}

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """Every trainable policy tensor of a LoRA learner (the adapters, and modules PEFT trains whole)."""
        params = self._trainable()
        with self.backend.gathered(params.values()):
            return {name: p.detach().cpu().clone() for name, p in params.items()}

    def _load_adapter(self, saved: dict[str, torch.Tensor]) -> None:
        params = self._trainable()
        odd = sorted(set(params) ^ set(saved))
        if odd:
            where = "missing from the checkpoint" if odd[0] in params else "not in this LoRA model"
            raise ValueError(f"learner state: adapter tensor {odd[0]!r} {where}")
        with self.backend.gathered(params.values()), torch.no_grad():
            for name, p in params.items():
                if tuple(saved[name].shape) != tuple(p.shape):
                    raise ValueError(f"learner state: adapter tensor {name!r} has shape {tuple(saved[name].shape)}, "
                                     f"this LoRA model expects {tuple(p.shape)}")
                p.copy_(saved[name].to(device=p.device, dtype=p.dtype))
