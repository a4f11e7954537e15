"""Learner: one RL update of a diffusion policy from a batch of scored trajectories (plain torch; no Ray).

    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, ...))
    metrics = learner.update(samples)               # rl.sample.ScoredSample list, advantages set by the driver
    for version, entries in learner.weight_buckets(64 << 20): engine.update_weights(entries, version, final=False)

One update, top to bottom:
1. Unpack the scored samples (sample key = request id) and plan inner iterations / minibatches / micro-batches
   (`rl.learner_batch.plan_update`).
2. Before any weight changes, under no_grad: OLD log-likelihoods for every inner iteration's mask seed (estimators
   that reseed per inner iteration, as d1 does, get one old pass per iteration; the trajectory estimator is
   deterministic, one pass serves all), REFERENCE log-likelihoods when the KL is measured against a reference
   model (a frozen copy, or the same PEFT model with its adapters disabled when training LoRA; rl.reference
   places the copy: in host memory between updates with offload_reference, partitioned under ZeRO-3), old values and
   the value model's token advantages and returns (TraceRL), and `logp_mismatch` (rollout log-probs vs the
   learner's, trajectory estimator). Cached per (mask key, sample) as `OldScores` / `RefScores`, per sample as
   `ValueScores`. Old/ref passes run on exactly the micro-batches training will use, so the
   first on-policy step sees ratio 1 bit for bit. (Step 2 lives in rl/learner_scoring.py.) Samples trained before
   the first optimizer step (the first minibatch of the first inner iteration; with mu 1 and one minibatch, all
   of them) skip the OLD pass (`fuse_on_policy_old_logp`): their training forward in step 4 records pi_old
   (detached), the same update bit for bit with one scoring forward per such sample fewer.
3. The global loss normaliser of every minibatch (sum over all its samples on all ranks, `rl.algorithms`), so
   micro-batching and data-parallel splits give the whole-batch gradient.
4. mu inner iterations: per minibatch, micro-batch backward passes with gradient accumulation, then one optimizer
   step (lr schedule, global-norm clipping). A non-finite loss or gradient skips the step: weights stay as they
   were, `nan_skipped` counts it.

Metrics of `update` (floats): the loss's own (means over micro-batches: loss, pg_loss, kl_loss, clipfrac*,
ratio_*, approx_kl, kl, adv_*, num_tokens, num_seqs, entropy when asked, ...), value_loss / value_clipfrac /
value_mean / return_mean / value_error (value model), logp_mismatch / logp_mismatch_max, grad_norm (mean over
applied steps, before clipping) / grad_norm_max, lr (last step), optimizer_steps, nan_skipped (this update),
nan_skipped_total, forwards (all passes) / forwards_old / forwards_ref, num_samples, time_s, time_old_s, update.
Optimizer steps per update: mu * ceil(B / (micro_batch_size * grad_accum * world_size)) (mu when grad_accum is None).
With `pack_tokens`, micro-batches hold up to that many layout tokens and every scoring forward packs its samples
into shared rows (rl.learner_batch, rollout.models.layout): the same update, less compute spent on padding.

Value model (TraceRL, `LearnerConfig.value`): a `rl.value.ValueHead` reading the hidden state of each token at its
noisy position in the trajectory estimator's passes. trunk="shared" (default): the head sits on the policy's own
trunk, so old values and values cost no extra forward, and the value loss (times `coef`) joins the policy loss
(the trunk gets both gradients; the head has its own lr). trunk="separate": a copy of the policy (or the
`value_policy` given) is the value trunk, trained with the value lr, at the cost of its own forwards.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext

import torch

from rl.algorithms import LOSSES, PolicyBatch, PolicyEstimates, make_loss_config
from rl.algorithms.dtreerpo import DistillTerms, distill_schedule, distill_terms
from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput, layout_tokens, token_mask_of
from rl.learner_batch import (
    MetricLog,
    RolloutBatch,
    StepTally,
    minibatch_normalizers,
    plan_update,
    rollout_batch,
    stack_rows,
)
from rl.learner_config import LearnerConfig, ValueConfig, check_packing  # noqa: F401 - re-exported: LearnerConfig
from rl.learner_draws import (
    check_per_draw,
    merge_draw_metrics,
    stacked_shares,
)
from rl.learner_scoring import DETERMINISTIC_ESTIMATORS, BeforeTrainingMixin
from rl.learner_state import STATE_FORMAT, LearnerStateMixin  # noqa: F401 - re-exported: STATE_FORMAT
from rl.masking import sample_seed
from rl.optim import param_groups
from rl.published import needs_reference_model
from rl.reference import (
    check_ref_sync,
    place_reference,
    sync_reference,
)
from rl.router_aux import router_aux_for
from rl.sample import ScoredSample
from rl.value import ValueHead, value_loss
from rollout.models.layout import RowPacking
from rollout.models.policy import DiffusionPolicy


def enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant): transformers >= 5.23 names it activation_checkpointing_enable (the
    old name warns on every call and goes in v6); remote-code models may only have the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Learner(LearnerStateMixin, BeforeTrainingMixin):
    """Trains `policy` in place.

    ref_policy: the frozen reference (default: a copy of `policy` as given; on resume pass the run's initial
      checkpoint, not the trained policy). Not used when training LoRA (adapters off is the reference).
    value_policy: trunk of a separate value model (default: a copy of `policy`).
    Weight streaming and checkpoint state (named_weights, weight_buckets, state_dict, load_state_dict) come from
    rl.learner_state."""

    def __init__(self, policy: DiffusionPolicy, config: LearnerConfig, *, ref_policy: DiffusionPolicy | None = None,
                 value_policy: DiffusionPolicy | None = None):
        self.policy, self.config = policy, config
        self.loss_fn = LOSSES.get(config.algorithm)
        self.loss_config = make_loss_config(config.algorithm, **config.loss)
        self._thaw_hints = self.loss_config.hint_entropy_keep > 0  # IGPO: entropy-filtered hints trained on
        self.estimator = get_estimator(config.estimator)
        self.lora = hasattr(policy.model, "disable_adapter")
        deterministic = config.estimator in DETERMINISTIC_ESTIMATORS
        if config.old_logp not in ("recompute", "rollout"):
            raise ValueError(f"learner.old_logp: unknown source {config.old_logp!r} (recompute | rollout)")
        if config.old_logp == "rollout" and config.estimator not in DETERMINISTIC_ESTIMATORS:
            raise ValueError("learner.old_logp: 'rollout' needs the trajectory estimator, whose log-probs are the "
                             f"rollout's own quantities (got {config.estimator!r})")
        self.reseed = (not deterministic) if config.reseed_per_inner is None else config.reseed_per_inner
        check_packing(config, self.loss_config, native=policy.native)
        self.router_aux = router_aux_for(policy, config.router_aux_loss_coef)  # MoE load balancing (rl.router_aux)
        lc = self.loss_config
        # Log-probs from raw logits (every reference) unless the loss asks for the rollout temperature.
        self.score_temperature = config.temperature if lc.logp_temperature == "rollout" else 1.0
        if config.old_logp == "rollout" and self.score_temperature != config.temperature:
            raise ValueError(f"learner.old_logp: 'rollout' log-probs were recorded at temperature "
                             f"{config.temperature}; score at it too (algorithm logp_temperature: rollout)")
        need_ref = config.reference_model if config.reference_model is not None else (
            needs_reference_model(lc.beta, lc.kl_reference))
        self.ref_policy = None
        if need_ref and not self.lora:
            if ref_policy is None:
                frozen = copy.deepcopy(policy.model)
                ref_policy = policy.with_model(frozen) if hasattr(policy, "with_model") else DiffusionPolicy(
                    frozen, policy.tokenizer, policy.spec, policy.source, attention_kernel=policy.attention_kernel)
            ref_policy.model.requires_grad_(False).eval()
            self.ref_policy = ref_policy
        self.need_ref = bool(need_ref)
        self.per_draw = lc.per_draw_backward  # BGPO: forward + backward one Monte Carlo draw at a time
        if self.per_draw:
            check_per_draw(config.estimator, self.need_ref, config.value is not None)
        self.value_head = self.value_policy = None
        modules = {"policy": policy.model}
        groups = param_groups(policy.model.named_parameters(), lr=config.optim.lr,
                              weight_decay=config.optim.weight_decay)
        vc = config.value
        if vc is not None:
            if config.estimator != "trajectory":
                raise ValueError("value model: needs the trajectory estimator (values are read along the trajectory)")
            self.value_head = ValueHead(policy.hidden_size).to(policy.device)
            modules["value_head"] = self.value_head
            value_params = list(self.value_head.named_parameters())
            if vc.trunk == "separate":
                if value_policy is None:  # a plain copy of the policy (LoRA merged away) is the trunk
                    trunk = copy.deepcopy(policy.model)
                    trunk = trunk.merge_and_unload() if self.lora else trunk
                    value_policy = DiffusionPolicy(trunk, policy.tokenizer, policy.spec, policy.source,
                                                   attention_kernel=policy.attention_kernel)
                value_policy.model.requires_grad_(True)
                self.value_policy = value_policy
                modules["value_trunk"] = value_policy.model
                value_params += list(value_policy.model.named_parameters())
            groups += param_groups(value_params, lr=vc.lr, weight_decay=config.optim.weight_decay, tag="value")
        if config.gradient_checkpointing:
            for pol in (policy, self.value_policy):
                if pol is not None:
                    enable_checkpointing(pol.causal_lm)
        self.module = torch.nn.ModuleDict(modules)
        if config.backend == "torch":
            from rl.learner_backend import TorchBackend

            self.backend = TorchBackend(self.module, groups, config.optim, config.grad_clip)
        elif config.backend == "deepspeed":
            from rl.learner_backend import DeepSpeedBackend

            self.backend = DeepSpeedBackend(self.module, groups, config.optim, config.grad_clip,
                                            zero_stage=config.zero_stage, bf16=config.bf16,
                                            offload_optimizer=config.offload_optimizer)
        else:
            raise ValueError(f"learner.backend: {config.backend!r} (torch | deepspeed)")
        self._ref_engine = place_reference(self.ref_policy, config, self.backend, need_ref=self.need_ref)
        check_ref_sync(config, self.ref_policy, self.lora, self._ref_engine)
        self.ref_syncs = 0  # reference re-syncs done (learner.ref_sync_steps); saved with the reference (state)
        self.updates = 0  # update() calls completed (the policy version after the initial one)
        self.optimizer_steps = 0  # applied optimizer steps (the lr schedule's counter)
        self.nan_skipped_total = 0
        self._set_mode(train=False)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.policy.device

    def _set_mode(self, train: bool) -> None:
        # Dropout stays off (eval) unless activation checkpointing needs train mode (HF only checkpoints then).
        self.module.train(train and self.config.gradient_checkpointing)

    def _autocast(self):
        if self.config.bf16 and self.config.backend == "torch":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _mask_iter(self, inner_iter: int) -> int:
        return inner_iter if self.reseed else 0

    def _estimate(self, policy: DiffusionPolicy, inp: EstimatorInput, inner_iter: int, *, hidden: bool = False,
                  estimator=None, params=None, synced: bool = True, routes: bool = False):
        """Run an estimator; under ZeRO-3 every rank then pads to the same number of forwards. Returns the
        estimate and a zero-valued term the caller adds to its loss (it ties the padding forwards into backward)."""
        fn = estimator or self.estimator
        packing = {} if self.config.pack_tokens is None else {"packing": RowPacking(self.config.pack_row_tokens)}
        recording = self.router_aux.recording() if routes and self.router_aux is not None else nullcontext()
        with self._autocast(), recording:
            est = fn(policy, inp, seed=self._mask_seed, inner_iter=inner_iter, temperature=self.score_temperature,
                     return_entropy=self.config.entropy or self._thaw_hints, return_hidden=hidden, **packing,
                     **(self.config.estimator_params if params is None else params))
        pad = torch.zeros((), device=self.device)
        if synced and self.backend.sync_forwards:
            most = int(self.backend.all_reduce_max(torch.tensor([est.forwards], device=self.device)).item())
            dummy = ([inp.prompts[0][:1]], [inp.responses[0][:1]], [inp.responses[0][:1]])
            for _ in range(most - est.forwards):
                pad = pad + 0.0 * policy.score_responses(*dummy).logprobs.sum()
        return est, pad

    def _reference(self):
        if self.ref_policy is not None:
            return self.ref_policy, False
        return self.policy, True  # LoRA: the same model with adapters disabled (see _ref_context)

    def _ref_context(self):
        return self.policy.model.disable_adapter() if self.ref_policy is None else nullcontext()

    # ------------------------------------------------------------------------------------------------ update
    # How data-parallel ranks' values of update()'s metrics merge into one (rl.learner_worker.merge_metrics):
    # forward counts add up, the slowest rank's time counts, figures every rank holds identically (optimizer
    # state, counters, all-reduced grad norm and mismatch) come from rank 0; every other metric is the mean.
    METRIC_MERGE = {
        **dict.fromkeys(("forwards", "forwards_old", "forwards_ref"), "sum"),
        **dict.fromkeys(("time_s", "time_old_s"), "max"),
        **dict.fromkeys(("lr", "optimizer_steps", "nan_skipped", "nan_skipped_total", "num_samples", "update",
                         "grad_norm", "grad_norm_max", "logp_mismatch", "logp_mismatch_max"), "rank0"),
    }

    def update(self, samples: list[ScoredSample]) -> dict[str, float]:
        """One RL update (mu inner iterations) on a batch; returns metrics (listed in the module doc)."""
        cfg, start = self.config, time.perf_counter()
        vc = cfg.value
        batch = rollout_batch(samples, need_advantage=vc is None, reward_key=vc.reward_key if vc else "reward")
        if vc is not None and batch.rewards is None:
            raise ValueError(f"value model: every sample needs its {vc.reward_key} (ScoredSample.{vc.reward_key})")
        if self.loss_config.token_set == "response":  # train every decoded token, EOS padding included
            batch.inp.valid_lengths = None
        self._mask_seed = sample_seed(cfg.seed, "masks", self.updates)
        self._thawed: set[str] = set()  # samples whose hints the entropy filter has seen (IGPO)
        tokens = None if cfg.pack_tokens is None else layout_tokens(self.estimator, self.policy.spec, batch.inp,
                                                                    cfg.estimator_params)
        plan = plan_update(len(batch), mu=cfg.mu, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                           world_size=self.backend.world_size, rank=self.backend.rank, shuffle=cfg.shuffle,
                           seed=sample_seed(cfg.seed, "shuffle", self.updates), pack_tokens=cfg.pack_tokens,
                           sample_tokens=tokens)
        log = MetricLog()
        counters = {"forwards": 0, "forwards_old": 0, "forwards_ref": 0}
        self._set_mode(train=False)
        with torch.no_grad():
            self._before_training(batch, plan, counters)
        norms, vnorms = minibatch_normalizers(plan, lambda it, i: self._counted(self._mask_iter(it), i),
                                              self.loss_config, self.backend.all_reduce_sum, self.device)
        t_old = time.perf_counter() - start
        tally = StepTally()
        self._set_mode(train=True)
        for it, minibatches in enumerate(plan):
            for m, micros in enumerate(minibatches):
                norm = norms[it, m].item() / self.backend.grad_average
                vnorm = vnorms[it, m].item() / self.backend.grad_average
                # The router aux loss is a mean over this rank's minibatch (the backend averages ranks' gradients).
                in_minibatch = max(1, sum(len(mc) for mc in micros))
                distill = self._distill_terms(batch, self._mask_iter(it), micros)  # d-TreeRPO, at this step's t
                for k, micro in enumerate(micros):
                    dummy = not micro
                    draws = self._draw_plan(micro or [0], self._mask_iter(it))
                    parts = []
                    for d, draw in enumerate(draws):
                        # the router aux loss is spread over the draws so a micro-batch adds it once in total
                        loss, metrics, fwd = self._micro_loss(batch, micro or [0], self._mask_iter(it), norm, vnorm,
                                                              draw=draw, distill=distill,
                                                              aux_share=len(micro) / in_minibatch / len(draws))
                        counters["forwards"] += fwd
                        if dummy:
                            loss = loss * 0.0  # a rank with no sample left still joins the collective backward
                        parts.append(metrics)
                        # per-draw backward: this draw's graph is freed before the next draw is scored
                        self.backend.backward(loss, boundary=k == len(micros) - 1 and d == len(draws) - 1)
                    if not dummy:
                        log.add(parts[0] if len(parts) == 1 else merge_draw_metrics(parts))
                self._optimizer_step(tally)
        if self._mismatch is None:  # fused on-policy update: the training forwards recorded the old log-probs
            self._mismatch = self._logp_mismatch(batch, plan, counters)
        out = log.means()
        out.update(self._finish_update(tally, len(batch)))
        out.update({"time_s": time.perf_counter() - start, "time_old_s": t_old,
                    **{k: float(v) for k, v in counters.items()}})
        out["forwards"] += out["forwards_old"] + out["forwards_ref"]
        out.update(self._mismatch)
        return out

    def _distill_terms(self, batch: RolloutBatch, key: int, micros: list[list[int]]):
        """d-TreeRPO's self-distillation at the coming optimizer step t: per sample (c, log q) over the whole batch's
        sibling groups, lambda(t), and the minibatch's global sum of c (rl/algorithms/dtreerpo.py); None when off."""
        lc = self.loss_config
        if lc.distill_lambda_max == 0 or batch.sibling_groups is None:
            return None
        lam, tau = distill_schedule(self.optimizer_steps, lc)
        coef, log_q = distill_terms(batch.sibling_groups, [float(a) for a in batch.advantages], batch.inp.responses,
                                    [self._old[(key, i)].counted for i in range(len(batch))], tau)
        local = sum(float(coef[i].sum()) for mc in micros for i in mc)
        total = self.backend.all_reduce_sum(torch.tensor([local], dtype=torch.float64, device=self.device))
        return coef, log_q, lam, float(total[0]) / self.backend.grad_average

    def _optimizer_step(self, tally: StepTally) -> None:
        """The optimizer step ending a minibatch; a non-finite loss or gradient skips it (the weights stay)."""
        gnorm, applied, tally.lr = self.backend.step(self.optimizer_steps)
        if applied:
            self.optimizer_steps += 1
            tally.grad_norms.append(gnorm)
            if self.config.ref_sync_steps and self.optimizer_steps % self.config.ref_sync_steps == 0:
                sync_reference(self.policy.model, self.ref_policy.model, self.config.ref_sync_alpha,
                               self.backend.gathered)
                self.ref_syncs += 1
        else:
            tally.skipped += 1

    def _finish_update(self, tally: StepTally, num_samples: int) -> dict[str, float]:
        """Close an update (eval mode, counters); the metrics every update reports of its steps."""
        self._set_mode(train=False)
        self.updates += 1
        self.nan_skipped_total += tally.skipped
        return {**tally.metrics(), "nan_skipped_total": float(self.nan_skipped_total),
                "num_samples": float(num_samples), "update": float(self.updates)}

    def _values(self, inp: EstimatorInput, est) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Per-token values (B, L) from the shared trunk's estimate or the separate trunk's own passes."""
        if self.value_policy is None:
            return self.value_head(est.hidden), 0, torch.zeros((), device=self.device)
        vest, pad = self._estimate(self.value_policy, inp, 0, hidden=True)
        return self.value_head(vest.hidden), vest.forwards, pad

    def _draw_params(self, draw: int | None) -> dict:
        params = dict(self.config.estimator_params)
        if draw is not None:
            params["draw_index"] = draw
        return params

    def _draw_plan(self, micro: list[int], key: int) -> list[int | None]:
        """The draws scored one forward + backward each: all of them at once ([None]) unless per-draw (BGPO)."""
        if not self.per_draw:
            return [None]
        return list(range(int(self._old[(key, micro[0])].draw_elbos.numel())))

    def _micro_loss(self, batch: RolloutBatch, micro: list[int], key: int, norm: float, vnorm: float,
                    draw: int | None = None, aux_share: float = 1.0, distill=None):
        inp = batch.inp.select(micro)
        vc = self.config.value
        shared_value = vc is not None and vc.trunk == "shared"
        est, pad = self._estimate(self.policy, inp, key, hidden=shared_value, params=self._draw_params(draw),
                                  routes=True)
        width, dev = est.token_logp.shape[1], self.device
        mask = token_mask_of(inp, dev)
        self._record_fused_old(inp, micro, key, est)  # samples whose pi_old is this forward (before any step)
        old = [self._old[(key, i)] for i in micro]
        if vc is not None:
            adv = stack_rows([self._value[i].advantages for i in micro], width, dev)
        elif all(batch.advantages[i].dim() == 0 for i in micro):
            adv = torch.stack([batch.advantages[i] for i in micro]).to(dev)
        else:
            adv = stack_rows([batch.advantages[i] for i in micro], width, dev, dtype=torch.float32)
        lengths = torch.tensor([inp.length(r) for r in range(len(inp))], device=dev)  # decoded (generation) length
        pb = PolicyBatch(advantages=adv, token_mask=mask, loss_normalizer=norm, lengths=lengths,
                         step_ids=stack_rows([inp.step_maps[r] for r in range(len(inp))], width, dev,
                                             dtype=torch.long))
        if distill is not None:
            coef, log_q, lam, total = distill
            pb.distill = DistillTerms(stack_rows([coef[i] for i in micro], width, dev, dtype=torch.float32),
                                      stack_rows([log_q[i] for i in micro], width, dev, dtype=torch.float32), lam, total)
        pe = PolicyEstimates(logp=est.token_logp, old_logp=stack_rows([o.token_logp for o in old], width, dev),
                             entropy=est.entropy, observed_mask=est.token_mask, seq_logp=est.seq_logp,
                             seq_old_logp=torch.stack([o.seq_logp for o in old]).to(dev),
                             mc_logp=est.extra.get("mc_logp"), mc_weights=est.extra.get("mc_weights"),
                             token_weight=est.extra.get("token_weight"))
        if draw is not None:
            pe.mc_old_elbo = torch.stack([o.draw_elbos[draw:draw + 1] for o in old]).to(dev)
            pe.mc_draws = int(old[0].draw_elbos.numel())
        else:  # every draw in one graph: the old shares of all of them (BGPO with per_draw_backward off)
            pe.mc_old_elbo = stacked_shares([o.draw_elbos for o in old], dev)
        if self.need_ref:
            ref = [self._ref[(key, i)] for i in micro]
            pe.ref_logp = stack_rows([r.token_logp for r in ref], width, dev)
            pe.seq_ref_logp = torch.stack([r.seq_logp for r in ref]).to(dev)
        loss, metrics = self.loss_fn(pb, pe, self.loss_config)
        loss = loss + pad
        if self.router_aux is not None:  # this micro-batch's share of the minibatch's mean aux loss
            aux = self.router_aux.take()
            loss = loss + self.config.router_aux_loss_coef * aux_share * aux
            metrics["router_aux_loss"] = float(aux.detach())
        forwards = est.forwards
        if vc is not None:
            values, vfwd, vpad = self._values(inp, est)
            forwards += vfwd
            old_v = stack_rows([self._value[i].old_values for i in micro], width, dev)
            returns = stack_rows([self._value[i].returns for i in micro], width, dev)
            counted = stack_rows([o.counted for o in old], width, dev, fill=False, dtype=torch.bool)
            vloss, vmetrics = value_loss(values, old_v, returns, counted, clip=vc.clip, normalizer=vnorm)
            loss = loss + vc.coef * vloss + vpad
            metrics.update(vmetrics)
        return loss, metrics, forwards
