"""What a Learner is configured with: the loss, the estimator, the optimiser, batching, the value model.

`rl.learner.Learner` takes a `LearnerConfig`; the recipe's learner/algorithm/estimator sections build it
(launch/driver_roles.learner_config). Published values come from rl/published.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rl.learner_batch import VALUE_TARGETS
from rl.optim import OptimConfig
from rl.published import ALGORITHM_DEFAULTS

_TRACERL_VALUE = ALGORITHM_DEFAULTS["tracerl"].value_model


@dataclass
class ValueConfig:
    lr: float = _TRACERL_VALUE["lr"]  # TraceRL's published value model (rl/published.py)
    clip: float | None = _TRACERL_VALUE["clip"]
    gamma: float = _TRACERL_VALUE["gamma"]
    lam: float = _TRACERL_VALUE["lam"]
    coef: float = 1.0  # weight of the value loss added to the policy loss
    trunk: str = "shared"  # "shared" | "separate" (see module doc)
    # ScoredSample field of the outcome reward on the last step: "advantage" = the group-normalised, filtered
    # reward the driver computed (TraceRL: dLLM-RL feeds its z-scored reward to the value model), "reward" = the
    # raw score (an option).
    reward_key: str = "advantage"
    returns: str = "mc"  # "mc" (TraceRL) | "gae"

    def __post_init__(self) -> None:
        if self.trunk not in ("shared", "separate"):
            raise ValueError(f"value_model.trunk: {self.trunk!r} (shared | separate)")
        if self.reward_key not in VALUE_TARGETS:
            raise ValueError(f"value_model.reward_key: {self.reward_key!r} not in {VALUE_TARGETS}")


@dataclass
class LearnerConfig:
    algorithm: str = "tracerl"  # a loss in rl.algorithms.LOSSES
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides (published defaults otherwise)
    estimator: str = "trajectory"  # an estimator in rl.estimators
    estimator_params: dict[str, Any] = field(default_factory=dict)
    reseed_per_inner: bool | None = None  # new masks each inner iteration (d1); None: unless deterministic
    temperature: float = 1.0  # the rollout's sampling temperature (scored at it only with logp_temperature=rollout)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_clip: float | None = 1.0  # global-norm clip; None or 0: none
    micro_batch_size: int = 1  # samples per forward/backward on one worker
    # Packed micro-batches: None = micro_batch_size samples per micro-batch, one per row, padded to the longest;
    # an int = micro-batches of at most this many layout tokens (prompt + 2 x response for block models, prompt +
    # response for full-attention ones; a longer sample alone), several samples sharing each row of every scoring
    # forward (rollout/models/layout.py). Same gradient; minibatches (optimizer steps) still count samples.
    pack_tokens: int | None = None
    # Row length of packed forwards (rollout.models.layout.RowPacking): None = the forward's longest layout (right
    # under a dense mask, where a row costs its width squared); the chunked kernel (CPU) and FlexAttention (GPU) skip
    # other documents' keys, so set it to pack_tokens there: one row per micro-batch, no padding (BENCHMARKS.md).
    pack_row_tokens: int | None = None
    grad_accum: int | None = None  # micro-batches per optimizer step per worker; None: whole batch per step
    mu: int = 1  # inner iterations over the batch
    shuffle: bool = True  # reshuffle the batch each inner iteration (explicit generator)
    reference_model: bool | None = None  # None: when the loss has beta > 0 and kl_reference == "ref"
    # torch: forwards under torch.autocast(bf16) over the weights as loaded (CPU or GPU; fp32 weights stay fp32);
    # deepspeed: bf16 mixed precision. Low-precision weights always train through fp32 masters (torch backend:
    # rl.optim.MasterWeights; ZeRO keeps its own fp32 partitions), with or without this flag.
    bf16: bool = False
    # The frozen reference in host memory, on the device only for its passes (rl.reference); under ZeRO-3 the
    # reference is partitioned over the ranks whatever this says, and this keeps its partitions in host memory.
    offload_reference: bool = False
    # Re-sync the KL reference to the policy every N applied optimizer steps (TRL's SyncRefModelCallback, TR-DPO):
    # ref <- alpha * policy + (1 - alpha) * ref, parameters only; 0 = never (the reference stays the initial policy).
    # alpha 1 replaces the reference by the policy; TRL's default ref_model_mixup_alpha is 0.6. Needs a separate
    # reference model (not LoRA's adapters-off base, which TRL leaves unsynced too), not partitioned by ZeRO-3.
    ref_sync_steps: int = 0
    ref_sync_alpha: float = 0.6
    gradient_checkpointing: bool = False  # HF per-layer (activation) checkpointing of the policy (and value trunk)
    value: ValueConfig | None = None
    log_mismatch: bool | None = None  # rollout vs learner logp gap; None: only when free (trajectory estimator)
    # pi_old: "recompute" (learner weights before the update) or "rollout" (the log-probs the rollout recorded, the
    # behaviour policy's: correct importance ratios for stale asynchronous data; trajectory estimator only).
    old_logp: str = "recompute"
    # Samples trained before the update's first optimizer step (all of them when mu = 1 with one minibatch, verl's
    # "on-policy" case; else the first minibatch) are scored by the policy being trained, so "recompute" takes their
    # pi_old from the training forward itself (detached) instead of a separate no-grad pass: the same update bit for
    # bit (tests/rl/test_learner_on_policy.py), one scoring forward per such sample fewer. The separate pass stays
    # wherever something needs pi_old before the first backward (rl.learner_scoring.fuses_old_logp says which).
    fuse_on_policy_old_logp: bool = True
    entropy: bool = False  # compute per-token entropy (metric)
    # Mixture-of-experts policies: coef x the router load-balancing loss (rl/router_aux.py) joins the policy loss;
    # 0 = off (the default; SDAR's published MoE training sets none).
    router_aux_loss_coef: float = 0.0
    backend: str = "torch"  # torch | deepspeed
    zero_stage: int = 2
    offload_optimizer: bool = False  # deepspeed: ZeRO-Offload (optimizer state and step in host memory)
    seed: int = 0


def check_packing(config: LearnerConfig, loss_config, *, native: bool) -> None:
    """learner.pack_tokens is refused (one line) where packing could not give the unpacked update."""
    if config.pack_tokens is None:
        if config.pack_row_tokens is not None:
            raise ValueError("learner.pack_row_tokens: needs learner.pack_tokens (packing is off)")
        return
    if config.pack_tokens < 1:
        raise ValueError(f"learner.pack_tokens: must be >= 1 (or None), got {config.pack_tokens}")
    if config.pack_row_tokens is not None and config.pack_row_tokens < 1:
        raise ValueError(f"learner.pack_row_tokens: must be >= 1 (or None), got {config.pack_row_tokens}")
    if loss_config.loss_agg == "step_pooled_mean":
        raise ValueError("learner.pack_tokens: loss_agg 'step_pooled_mean' pools tokens per micro-batch, so cutting "
                         "micro-batches by tokens changes the loss; use micro_batch_size")
    if not native:
        raise ValueError("learner.pack_tokens: packed rows need transformers' own model classes (this remote-code "
                         "model takes only a padding mask)")
