"""The learner's view of a rollout batch (and its cached old / ref / value scores), and how one update is cut into inner iterations, minibatches, ranks and
micro-batches (pure functions; no model).

Plan of one update over B samples (`plan_update`): for each of the `mu` inner iterations the batch order is
(optionally) shuffled with an explicit generator; the order is cut into global minibatches of
`micro_batch_size * grad_accum * world_size` samples (the whole batch when grad_accum is None), one optimizer step
each; rank r takes every world_size-th sample of a minibatch, starting at r, and cuts its share into micro-batches
of `micro_batch_size`. Every rank gets the same number of micro-batches per minibatch (a rank with fewer samples
gets empty ones, which it runs as zero-weight dummies), because data-parallel backends reduce gradients on every
backward. Every rank computes the same plan from the same batch, so no rank needs to ask another what it holds.

Packed micro-batches (`pack_tokens`): minibatches and ranks' shares are cut as above (so optimizer steps do not
change), but each rank's share is cut into micro-batches by first-fit-decreasing on the samples' layout lengths,
`pack_tokens` layout tokens at most per micro-batch (a longer sample alone), instead of `micro_batch_size`
samples. Every rank computes every rank's bins and pads its own to the most any rank has (empty micro-batches).
The loss normaliser is a per-minibatch sum over samples, so any cut gives the same gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from rl.algorithms import LossConfig, loss_normalizer
from rl.estimators.base import EstimatorInput
from rl.sample import ScoredSample
from rollout.models.layout import first_fit_decreasing


@dataclass
class RolloutBatch:
    inp: EstimatorInput  # every sample of the update (sample key = request id)
    advantages: list[torch.Tensor]  # per sample: 0-d (sequence advantage) or (L,) per-token
    rewards: torch.Tensor | None  # (B,) float: each sample's value-model target (ValueConfig.reward_key), when
    #                                every sample has one
    rollout_logp: list[torch.Tensor]  # (L,) log-probs recorded by the rollout engine
    request_ids: list[str]
    sibling_groups: list[str | None] | None = None  # d-TreeRPO edges' parent nodes (ScoredSample.sibling_group)

    def __len__(self) -> int:
        return len(self.inp)


# The learner's cached scores, computed before any weight change (Learner._before_training).
class OldScores(NamedTuple):
    """One sample under one mask key, before any weight change (pi_old)."""

    token_logp: torch.Tensor  # (n,) per-token log-probs of the response's n decoded tokens
    seq_logp: torch.Tensor  # () the sequence log-likelihood estimate (ELBO for sequence-level losses)
    counted: torch.Tensor  # (n,) bool: tokens the loss counts (valid ones; observed ones when observed_only)
    draw_elbos: torch.Tensor | None = None  # (K,) each Monte Carlo draw's ELBO share (per-draw backward, BGPO)


class RefScores(NamedTuple):
    """One sample under one mask key, scored by the KL reference."""

    token_logp: torch.Tensor  # (n,)
    seq_logp: torch.Tensor  # ()


class ValueScores(NamedTuple):
    """One sample's value-model results before any weight change (TraceRL)."""

    old_values: torch.Tensor  # (n,) V_j at each token's noisy position
    advantages: torch.Tensor  # (n,) token advantages A_j (rl.value.compute_value_targets)
    returns: torch.Tensor  # (n,) value targets R_j


def rollout_batch(samples: list[ScoredSample], *, need_advantage: bool = True,
                  reward_key: str = "reward") -> RolloutBatch:
    """Check and unpack scored samples; bad input fails with one line naming the trajectory and the field.
    reward_key: the ScoredSample field ("reward" or "advantage") that `RolloutBatch.rewards` holds."""
    if not samples:
        raise ValueError("learner.update: empty batch")
    prompts, responses, keys, valid, steps, advs, rewards, logps = [], [], [], [], [], [], [], []
    seen: set[str] = set()
    trajectories = [s.trajectory for s in samples]
    block_sizes = {int(t.block_size) for t in trajectories}
    if len(block_sizes) > 1:
        raise ValueError(f"learner.update: trajectories with different block sizes {sorted(block_sizes)}")
    for i, (sample, traj) in enumerate(zip(samples, trajectories)):
        rid = traj.request_id or f"#{i}"
        traj.validate()
        if traj.response_length == 0:
            raise ValueError(f"trajectory {rid}: empty response (finish_reason {traj.finish_reason!r})")
        if traj.request_id in seen:
            raise ValueError(f"trajectory {rid}: duplicate request_id (it seeds the sample's masks)")
        seen.add(traj.request_id)
        adv = sample.advantage
        if adv is None:
            if need_advantage:
                raise ValueError(f"trajectory {rid}: advantage missing (the driver computes advantages)")
            adv = 0.0
        adv = torch.as_tensor(adv, dtype=torch.float32).detach().cpu()
        if adv.dim() not in (0, 1) or (adv.dim() == 1 and adv.shape != (traj.response_length,)):
            raise ValueError(f"trajectory {rid}: advantage shape {tuple(adv.shape)} is neither () nor "
                             f"({traj.response_length},)")
        reward = value_target(sample, reward_key)
        rewards.append(None if reward is None else float(reward))
        prompts.append(traj.prompt_ids.long())
        responses.append(traj.response_ids.long())
        keys.append(traj.request_id or f"#{i}")
        valid.append(int(traj.valid_length))
        steps.append(traj.step_map.long())
        advs.append(adv)
        logps.append(traj.logprobs.float())
    traces = [t.canvas_trace for t in trajectories]
    prefilled = [t.prefilled.bool() if t.prefilled is not None else None for t in trajectories]
    entropies = [t.token_entropy for t in trajectories]  # AGRPO's entropy proposal, when every rollout has one
    inp = EstimatorInput(prompts, responses, keys, valid, steps, block_sizes.pop(),
                         traces if any(t is not None for t in traces) else None,
                         frozen=prefilled if any(p is not None for p in prefilled) else None,
                         token_entropies=None if any(e is None for e in entropies) else [e.float() for e in entropies])
    reward_t = None if any(r is None for r in rewards) else torch.tensor(rewards, dtype=torch.float32)
    groups = [s.sibling_group for s in samples]
    return RolloutBatch(inp, advs, reward_t, logps, keys,
                        sibling_groups=groups if any(g is not None for g in groups) else None)


VALUE_TARGETS = ("advantage", "reward")  # ScoredSample fields a value model may take as its outcome reward


def value_target(sample: ScoredSample, field: str) -> float | None:
    """The sample's outcome reward for the value model: its (group-normalised) advantage or its raw reward."""
    if field not in VALUE_TARGETS:
        raise ValueError(f"value model: reward_key {field!r} not in {VALUE_TARGETS}")
    value = sample.advantage if field == "advantage" else sample.reward
    return None if value is None else float(value)


def plan_update(num_samples: int, *, mu: int, micro_batch_size: int, grad_accum: int | None, world_size: int = 1,
                rank: int = 0, shuffle: bool = False, seed: int = 0, pack_tokens: int | None = None,
                sample_tokens: list[int] | None = None) -> list[list[list[list[int]]]]:
    """plan[inner_iter][minibatch] = this rank's micro-batches (lists of sample indices, possibly empty).
    pack_tokens: cut micro-batches by layout tokens (`sample_tokens[i]` for sample i) instead of sample count."""
    if mu < 1 or micro_batch_size < 1 or (grad_accum is not None and grad_accum < 1):
        raise ValueError("learner: need mu >= 1, micro_batch_size >= 1, grad_accum >= 1 (or None)")
    if not 0 <= rank < world_size:
        raise ValueError(f"learner: rank {rank} outside world of {world_size}")
    if pack_tokens is not None:
        if pack_tokens < 1:
            raise ValueError(f"learner.pack_tokens: must be >= 1 (or None), got {pack_tokens}")
        if sample_tokens is None or len(sample_tokens) != num_samples:
            raise ValueError("learner.pack_tokens: need the layout length of every sample (sample_tokens)")
    mb_size = num_samples if grad_accum is None else micro_batch_size * grad_accum * world_size
    plan = []
    for it in range(mu):
        if shuffle:
            gen = torch.Generator().manual_seed(int(seed) + it)
            order = torch.randperm(num_samples, generator=gen).tolist()
        else:
            order = list(range(num_samples))
        minibatches = []
        for start in range(0, num_samples, mb_size):
            mb = order[start:start + mb_size]
            if pack_tokens is not None:
                shares = [packed_micro_batches(mb[r::world_size], sample_tokens, pack_tokens)
                          for r in range(world_size)]
                count = max(len(bins) for bins in shares)
                minibatches.append(shares[rank] + [[] for _ in range(count - len(shares[rank]))])
                continue
            share = mb[rank::world_size]
            per_rank = -(-len(mb) // world_size)
            count = -(-per_rank // micro_batch_size)
            micros = [share[k * micro_batch_size:(k + 1) * micro_batch_size] for k in range(count)]
            minibatches.append(micros)
        plan.append(minibatches)
    return plan


def packed_micro_batches(share: list[int], sample_tokens: list[int], budget: int) -> list[list[int]]:
    """A rank's share (sample indices, in batch order) cut into micro-batches of at most `budget` layout tokens by
    first-fit-decreasing (deterministic); each micro-batch lists its samples in share order."""
    bins = first_fit_decreasing([int(sample_tokens[i]) for i in share], budget)
    return [[share[j] for j in sorted(members)] for members in bins]


def minibatch_normalizers(plan, counted_of: Callable[[int, int], torch.Tensor], config: LossConfig,
                          all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, M) global loss normalisers of every minibatch: policy (config.loss_agg) and value (counted tokens).
    counted_of(inner_iter, sample) is the sample's counted-token mask. step_pooled_mean counts micro-batches (its
    loss is a mean over calls); every other aggregation adds up per-sample shares."""
    mu, m = len(plan), max(len(mbs) for mbs in plan)
    local = torch.zeros((2, mu, m), dtype=torch.float64)
    for it, minibatches in enumerate(plan):
        for j, micros in enumerate(minibatches):
            for micro in micros:
                rows = [counted_of(it, i) for i in micro]
                if config.loss_agg == "step_pooled_mean":
                    local[0, it, j] += float(any(bool(r.any()) for r in rows))
                for counted in rows:
                    if config.loss_agg != "step_pooled_mean":
                        local[0, it, j] += float(loss_normalizer(counted[None], config.loss_agg,
                                                                 fixed_length=config.fixed_length))
                    local[1, it, j] += float(counted.sum())
    total = all_reduce_sum(local.to(device)).cpu()
    return total[0], total[1]


def logp_gaps(learner_logp: list[torch.Tensor], rollout_logp: list[torch.Tensor], valid_lengths: list[int],
              frozen: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """|learner - rollout| log-prob of each sample's first valid_length tokens, concatenated ((N,) float64, CPU):
    the train/inference mismatch the learner logs as logp_mismatch (mean) / logp_mismatch_max. `frozen`: per
    sample, positions left out (pre-filled hints: never sampled, so no rollout log-prob to compare)."""
    if not len(learner_logp) == len(rollout_logp) == len(valid_lengths):
        raise ValueError(f"logp_gaps: {len(learner_logp)} learner rows, {len(rollout_logp)} rollout rows, "
                         f"{len(valid_lengths)} lengths")
    gaps = [(mine[:n].double().cpu() - theirs[:n].double().cpu()).abs()
            for mine, theirs, n in zip(learner_logp, rollout_logp, valid_lengths)]
    if frozen is not None:
        gaps = [g if skip is None else g[~skip[:g.numel()].cpu().bool()] for g, skip in zip(gaps, frozen)]
    return torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)


def stack_rows(rows: list[torch.Tensor], width: int, device, fill: float = 0.0,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample 1-D rows (or 0-d scalars, broadcast) -> (B, width), right-padded with `fill`."""
    dtype = dtype or rows[0].dtype
    out = torch.full((len(rows), width), fill, dtype=dtype, device=device)
    for b, row in enumerate(rows):
        if row.dim() == 0:
            out[b, :] = row.to(device=device, dtype=dtype)
        else:
            out[b, :row.numel()] = row.to(device=device, dtype=dtype)
    return out


class MetricLog:
    """Running means of per-micro-batch metrics (non-finite values are counted apart, never averaged in)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.nonfinite = 0

    def add(self, metrics: dict) -> None:
        for name, value in metrics.items():
            value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(value):
                self.nonfinite += 1
                continue
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


@dataclass
class StepTally:
    """An update's optimizer steps so far: the grad norm of each applied step (so their count), the steps skipped on a
    non-finite loss or gradient, and the last step's lr."""
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    lr: float = 0.0

    def metrics(self) -> dict[str, float]:
        norms = self.grad_norms
        return {"grad_norm": sum(norms) / len(norms) if norms else float("nan"),
                "grad_norm_max": max(norms) if norms else float("nan"),
                "lr": self.lr, "optimizer_steps": float(len(norms)), "nan_skipped": float(self.skipped)}
