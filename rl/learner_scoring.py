"""The learner's scoring before any weight change (rl.learner.Learner, step 2 of an update): old and reference
log-likelihoods per (mask key, sample), the value model's old values and targets, and the rollout-vs-learner
log-prob mismatch. A mixin of `Learner`: it reads the learner's policy, estimator, backend and config through `self`
and fills `self._old`, `self._ref`, `self._value` and `self._mismatch`, which the training passes then read."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput, token_mask_of
from rl.inpainting import thaw_hints
from rl.learner_batch import (
    OldScores,
    RefScores,
    RolloutBatch,
    ValueScores,
    logp_gaps,
    stack_rows,
)
from rl.learner_draws import draw_shares_of, score_draw_by_draw
from rl.reference import reference_on_device
from rl.value import compute_value_targets

DETERMINISTIC_ESTIMATORS = ("trajectory", "canvas_trace", "ar_exact", "intermediate_state")  # masks: not (seed, iter)
# Estimators that score every valid token: with observed_only the counted tokens are then known without a forward.
FULLY_OBSERVED_ESTIMATORS = ("trajectory", "canvas_trace")


def fuses_old_logp(config, loss_config, *, per_draw: bool, thaw_hints: bool) -> bool:
    """Whether samples trained before the update's first optimizer step may take pi_old from their training forward
    (LearnerConfig.fuse_on_policy_old_logp): recomputed log-probs (not the rollout's) and nothing that needs pi_old
    before the first backward: a value model (its targets), per-draw backward (draw shares), IGPO's hint filter,
    d-TreeRPO's distillation (whole-batch sums), or counted tokens only the estimator's forward knows (observed_only
    with an estimator that scores a subset)."""
    return (config.fuse_on_policy_old_logp and config.old_logp == "recompute" and config.value is None
            and not per_draw and not thaw_hints and loss_config.distill_lambda_max == 0
            and (not loss_config.observed_only or config.estimator in FULLY_OBSERVED_ESTIMATORS))


class BeforeTrainingMixin:
    """Learner methods that score a batch under no_grad before the update's first optimizer step."""

    def _before_training(self, batch: RolloutBatch, plan, counters: dict) -> None:
        """Old / ref log-likelihoods, old values and value targets, mismatch: all before any weight change.

        Walks the plan's micro-batch slots (the same number on every rank). A slot is scored when some sample in
        it lacks a result under its mask key; under ZeRO-3 (collective forwards) every rank scores a slot any rank
        needs, a rank with nothing to do there scoring sample 0 and discarding it.

        Fused samples (`self._fused`: those of the first minibatch of inner iteration 0, when fuses_old_logp) get
        no old pass: their training forward comes before any weight change, so it records pi_old itself
        (`_record_fused_old`); with mu 1 and one minibatch that is every sample."""
        self._old: dict[tuple[int, int], OldScores] = {}  # (mask key, sample index) ->
        self._ref: dict[tuple[int, int], RefScores] = {}  # (mask key, sample index) ->
        self._value: dict[int, ValueScores] = {}  # sample index ->
        fuse = fuses_old_logp(self.config, self.loss_config, per_draw=self.per_draw, thaw_hints=self._thaw_hints)
        self._fused_key = self._mask_iter(0)
        self._fused = {i for micro in plan[0][0] for i in micro} if fuse and plan and plan[0] else set()
        # their counted tokens without a forward: the loss normalisers need them before training
        self._counted_ahead = {i: token_mask_of(batch.inp.select([i]), self.device)[0, :batch.inp.length(i)]
                               for i in self._fused}
        ref_policy, adapters_off = self._reference()
        offloaded = self.config.offload_reference and self._ref_engine is None
        ref_module = self.ref_policy.model if self.ref_policy is not None else None
        with reference_on_device(ref_module, self.device, offload=offloaded):
            self._score_before_training(batch, plan, counters, ref_policy, adapters_off)
        # fused + free: the mismatch reads old log-probs that the training forwards record (rl.learner)
        self._mismatch = None if self._fused and self._mismatch_is_free else self._logp_mismatch(batch, plan, counters)
        if self.config.old_logp == "rollout":
            self._use_behaviour_logp(batch)

    @property
    def _mismatch_is_free(self) -> bool:
        return self.config.estimator in DETERMINISTIC_ESTIMATORS  # the old pass recomputes the rollout's logps

    def _is_fused(self, key: int, i: int) -> bool:
        return key == self._fused_key and i in self._fused

    def _counted(self, key: int, i: int) -> torch.Tensor:
        """Sample i's counted-token mask under mask key `key`, known before training."""
        return self._counted_ahead[i] if self._is_fused(key, i) else self._old[(key, i)].counted

    def _record_fused_old(self, inp: EstimatorInput, micro: list[int], key: int, est) -> None:
        """pi_old of the fused samples in `micro` := this training forward's own estimate, detached (no weight has
        changed yet). Checks that the estimate counts the tokens the normalisers assumed ahead."""
        todo = [(r, i) for r, i in enumerate(micro) if self._is_fused(key, i) and (key, i) not in self._old]
        if not todo:
            return
        valid = token_mask_of(inp, self.device)
        counted = valid & est.token_mask if self.loss_config.observed_only else valid
        shares = draw_shares_of(est, valid)
        for r, i in todo:
            n = inp.length(r)
            if not torch.equal(counted[r, :n], self._counted_ahead[i]):
                raise RuntimeError(f"learner.fuse_on_policy_old_logp: estimator {self.config.estimator!r} left "
                                   "valid tokens unscored; set learner.fuse_on_policy_old_logp: false")
            self._old[(key, i)] = OldScores(est.token_logp[r, :n].detach(), est.seq_logp[r].detach(),
                                            self._counted_ahead[i], None if shares is None else shares[r].detach())

    def _score_before_training(self, batch: RolloutBatch, plan, counters: dict, ref_policy, adapters_off) -> None:
        vc = self.config.value
        shared_value = vc is not None and vc.trunk == "shared"
        # A partitioned reference's forwards are collective: every rank runs as many (padded) as the busiest.
        ref_synced = adapters_off or self._ref_engine is not None
        for it, minibatches in enumerate(plan):
            key = self._mask_iter(it)
            for micro in (mc for mb in minibatches for mc in mb):
                need_old = bool(micro) and (
                    any((key, i) not in self._old and not self._is_fused(key, i) for i in micro)
                    or (vc is not None and any(i not in self._value for i in micro)))
                need_ref = bool(micro) and self.need_ref and any((key, i) not in self._ref for i in micro)
                run_old, run_ref = need_old, need_ref
                if self.backend.sync_forwards:  # collective forwards: run where any rank needs them
                    flags = self.backend.all_reduce_max(torch.tensor([int(need_old), int(need_ref)],
                                                                     device=self.device))
                    run_old, run_ref = bool(flags[0]), bool(flags[1])
                if not (run_old or run_ref):
                    continue
                run = micro if need_old or need_ref else [0]
                inp = batch.inp.select(run)
                if run_old:
                    self._score_old(batch, run, inp, key, counters, shared_value, keep=need_old)
                if run_ref:
                    self._score_reference(inp, micro if need_ref else [], key, counters, ref_policy, adapters_off,
                                          ref_synced)

    def _score_old(self, batch: RolloutBatch, run: list[int], inp: EstimatorInput, key: int, counters: dict,
                   shared_value: bool, *, keep: bool) -> None:
        """pi_old (and the value model's old values and targets) of the samples `run` (their inputs `inp`); kept
        unless `keep` is False (a collective forward another rank needs)."""
        vc = self.config.value
        micro = run if keep else []
        shares = None
        if self.per_draw:  # scored one draw at a time, exactly as training will score them
            est, shares = score_draw_by_draw(
                lambda d: self._estimate(self.policy, inp, key, params=self._draw_params(d))[0],
                token_mask_of(inp, self.device))
        else:
            est, _ = self._estimate(self.policy, inp, key, hidden=shared_value)
            shares = draw_shares_of(est, token_mask_of(inp, self.device))
        counters["forwards_old"] += est.forwards
        if vc is not None:
            counters["forwards_old"] += self._value_targets(batch, run, inp, est, keep=keep)
        if not micro:
            return
        if self._thaw_hints:  # IGPO's entropy filter, at each sample's first old pass
            thaw_hints(batch.inp, inp, micro, est.entropy, self.loss_config.hint_entropy_keep, self._thawed)
        # Scored on the very micro-batches training uses; a sample already scored under this mask key
        # (deterministic estimators, or a sample this rank saw before) keeps its first result.
        counted = token_mask_of(inp, self.device)
        if self.loss_config.observed_only:
            counted = counted & est.token_mask
        for r, i in enumerate(micro):
            n = inp.length(r)
            self._old.setdefault((key, i), OldScores(est.token_logp[r, :n].detach(), est.seq_logp[r].detach(),
                                                     counted[r, :n].clone(),
                                                     None if shares is None else shares[r].detach()))

    def _score_reference(self, inp: EstimatorInput, micro: list[int], key: int, counters: dict, ref_policy,
                         adapters_off: bool, ref_synced: bool) -> None:
        """Reference log-likelihoods of `inp` (scored samples `micro`; [] for a collective forward whose result is
        discarded)."""
        with self._ref_context() if adapters_off else nullcontext():
            ref, _ = self._estimate(ref_policy, inp, key, synced=ref_synced)
        counters["forwards_ref"] += ref.forwards
        for r, i in enumerate(micro):
            n = inp.length(r)
            self._ref.setdefault((key, i), RefScores(ref.token_logp[r, :n].detach(), ref.seq_logp[r].detach()))

    def _use_behaviour_logp(self, batch: RolloutBatch) -> None:
        """pi_old := the behaviour policy's recorded log-probs (same tokens, same steps, same temperature)."""
        for (key, i), old in list(self._old.items()):
            recorded = batch.rollout_logp[i][: old.token_logp.numel()].to(old.token_logp)
            self._old[(key, i)] = OldScores(recorded, (recorded * old.counted).sum(), old.counted)

    def _value_targets(self, batch: RolloutBatch, micro: list[int], inp: EstimatorInput, est, *, keep: bool) -> int:
        vc = self.config.value
        values, fwd, _ = self._values(inp, est)
        mask = token_mask_of(inp, self.device)
        steps = stack_rows([inp.step_maps[r] for r in range(len(inp))], mask.shape[1], self.device, dtype=torch.long)
        targets = compute_value_targets(values.detach(), steps, mask, batch.rewards[micro].to(self.device),
                                        gamma=vc.gamma, lam=vc.lam, returns=vc.returns)
        for r, i in enumerate(micro if keep else []):
            n = inp.length(r)
            self._value.setdefault(i, ValueScores(values[r, :n].detach(), targets.advantages[r, :n],
                                                  targets.returns[r, :n]))
        return fwd

    def _logp_mismatch(self, batch: RolloutBatch, plan, counters: dict) -> dict[str, float]:
        """Mean / max |rollout logp - learner logp| over counted tokens, each sample once (inner iteration 0's
        shares), trajectory estimator: the old pass itself when that is the estimator, else extra passes."""
        want = self.config.log_mismatch
        free = self._mismatch_is_free
        if want is False or (want is None and not free):
            return {}
        gaps, worst = [], 0.0
        for micro in (mc for mb in plan[0] for mc in mb):
            if not micro and not self.backend.sync_forwards:
                continue
            if free:
                rows = [self._old[(0, i)].token_logp for i in micro]
            else:
                inp = batch.inp.select(micro or [0])
                est, _ = self._estimate(self.policy, inp, 0, estimator=get_estimator("trajectory"), params={})
                counters["forwards_old"] += est.forwards
                rows = [est.token_logp[r, :inp.length(r)] for r in range(len(micro))]
            frozen = None if batch.inp.frozen is None else [batch.inp.frozen[i] for i in micro]
            gap = logp_gaps(rows, [batch.rollout_logp[i] for i in micro], [batch.inp.valid_length(i) for i in micro],
                            frozen)
            gaps.append(gap)
            worst = max(worst, float(gap.max())) if gap.numel() else worst
        allgap = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)
        total = self.backend.all_reduce_sum(torch.tensor([float(allgap.sum()), float(allgap.numel())],
                                                         dtype=torch.float64, device=self.device))
        worst = float(self.backend.all_reduce_max(torch.tensor([worst], dtype=torch.float64, device=self.device)))
        return {"logp_mismatch": float(total[0] / total[1].clamp(min=1)), "logp_mismatch_max": worst}
