"""Optimizer, parameter groups and learning-rate schedule of the learner (plain torch; no Ray, no DeepSpeed).

The schedule is a pure function of the optimizer-step counter (`lr_factor`), applied by writing `lr` into each
param group before every step. Nothing else holds schedule state, so a checkpoint needs only the counter, and the
same code drives a torch optimizer or the optimizer DeepSpeed wraps (its param groups keep our extra keys).

Parameter groups: weight decay on matrices (dim >= 2) only, none on biases and norm weights (as HF Trainer, which
d1 used); the value head / value trunk get their own group with their own learning rate.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    name: str = "adamw"  # only AdamW (torch.optim.AdamW; DeepSpeed wraps the same client optimizer)
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    schedule: str = "constant"  # constant | cosine | linear (decay after warm-up)
    total_steps: int | None = None  # optimizer steps the decay spans (cosine/linear need it)
    min_lr_ratio: float = 0.0  # decay floor as a fraction of lr

    def __post_init__(self) -> None:
        if self.name != "adamw":
            raise ValueError(f"learner.optimizer: unknown optimizer {self.name!r} (adamw)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"learner.schedule: unknown schedule {self.schedule!r} ({' | '.join(SCHEDULES)})")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("learner: need lr > 0, warmup_steps >= 0, weight_decay >= 0")
        if self.schedule != "constant" and not (self.total_steps and self.total_steps > 0):
            raise ValueError(f"learner.schedule={self.schedule!r} needs total_steps > 0 (optimizer steps)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


def lr_factor(step: int, config: OptimConfig) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based: the step about to be taken)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, int(config.total_steps) - config.warmup_steps)
    progress = min(1.0, max(0.0, (step - config.warmup_steps) / span))
    floor = config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float, weight_decay: float,
                 tag: str = "policy") -> list[dict]:
    """Trainable params split into decay (dim >= 2) and no-decay groups; empty groups are left out.

    Each group carries `base_lr` (the schedule multiplies it) and `tag` (for metrics and checks)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "tag": tag})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "tag": tag})
    return groups


def make_optimizer(groups: list[dict], config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the groups. foreach=False: the per-tensor update is what DeepSpeed's flat partitions compute
    elementwise too, so the torch and ZeRO learners agree to rounding."""
    if not groups:
        raise ValueError("learner: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, foreach=False)


def apply_lr(optimizer: torch.optim.Optimizer, step: int, config: OptimConfig) -> float:
    """Write the scheduled lr into every param group; returns the policy lr (the first group's)."""
    factor = lr_factor(step, config)
    first = None
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
        first = group["lr"] if first is None else first
    return float(first if first is not None else 0.0)


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (float64; inf/nan propagate)."""
    norms = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(norms).norm()


def clip_grads(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global-norm clipping (as torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when norm > max_norm).
    Returns the norm before clipping; never clips when it is not finite (the caller skips the step)."""
    total = grad_norm(params)
    if max_norm and max_norm > 0 and bool(torch.isfinite(total)):
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
    return total


LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """fp32 master copies of the low-precision params of optimizer groups (mixed-precision training).

    `groups` are the groups as built for the model; `.groups` are the same groups over the masters (fp32 params
    stay themselves). The optimizer steps the masters; gradients are moved into the masters' fp32 `.grad` after
    each backward (so micro-batches accumulate in fp32) and the model params become the masters rounded to nearest
    after each applied step. Only trainable params are in the groups, so a LoRA model keeps masters of its
    adapters alone."""

    def __init__(self, groups: list[dict]):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model param, its fp32 master)
        self.groups = []
        for group in groups:
            params = []
            for p in group["params"]:
                if p.dtype in LOW_PRECISION:
                    master = p.detach().to(torch.float32).clone()
                    self.pairs.append((p, master))
                    params.append(master)
                else:
                    params.append(p)
            self.groups.append({**group, "params": params})

    def accumulate_grads(self) -> None:
        for p, master in self.pairs:
            if p.grad is None:
                continue
            grad = p.grad.detach().to(torch.float32)
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            p.grad = None

    def zero_model_grads(self) -> None:
        for p, _ in self.pairs:
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)  # fp32 -> bf16/fp16 copy_ rounds to nearest (even)

    def state(self) -> list[torch.Tensor]:
        return [master.detach().to("cpu", copy=True) for _, master in self.pairs]

    @torch.no_grad()
    def load(self, saved: list[torch.Tensor]) -> None:
        if len(saved) != len(self.pairs):
            raise ValueError(f"learner state: {len(saved)} fp32 master tensors, this learner has {len(self.pairs)}")
        for i, ((_, master), t) in enumerate(zip(self.pairs, saved)):
            if tuple(t.shape) != tuple(master.shape):
                raise ValueError(f"learner state: fp32 master {i} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(master.shape)}")
            master.copy_(t.to(device=master.device, dtype=torch.float32))
        self.copy_to_model()
