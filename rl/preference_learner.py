"""The DPO trainer path: one update of a diffusion policy from preference pairs (VRPO, dTRPO), no rollout.

    learner = PreferenceLearner(policy, LearnerConfig(algorithm="vrpo", estimator="mc_elbo",
                                                      estimator_params={"num_samples": 8}))
    metrics = learner.update(pairs)          # rl.preference_pairs.PreferencePair list

It is `rl.learner.Learner` (same optimiser, backends, frozen reference or LoRA adapters-off reference, weight
streaming and checkpoint state) with its own update, because a DPO loss needs both members of a pair in one
micro-batch and has no old policy:
1. Rows are laid chosen / rejected per pair (rl.preference_pairs.pair_samples); pairs, not rows, are shuffled and cut
   into minibatches of micro_batch_size * grad_accum PAIRS (grad_accum None: the whole batch, one optimizer step).
2. Before any weight change, under no_grad, the reference's estimate of every row for every mask key (estimators
   that reseed per inner iteration get one pass per iteration).
3. Antithetic sampling (VRPO, `antithetic=True`, the default): the reference's estimate of a row uses the masks
   (timesteps, mask sets; for dTRPO the drawn steps) of the policy's estimate of the same row, because both are
   drawn from the row's own generator seeded by (update seed, request id, inner iteration). `antithetic=False`
   draws the reference's masks from an independent seed (the variance comparison of the paper; an option only).
4. `reference_logp="stored"` (dTRPO's offline data, an option): the reference's per-token log-probs are the ones
   the rollout recorded (`Trajectory.logprobs`), valid when the data were decoded by the reference itself (stored
   policy version 0, temperature 1, no top-k/top-p: checked per trajectory) and the estimator scores each token in
   the context it was decoded in (`remasked_step`, `trajectory`): then B_ref = sum of the estimator's weights times
   the recorded log-probs of the tokens it scored, and no reference model is loaded or run (the policy's one
   forward is the only one).
Data-parallel ranks are not supported here yet (one process); the torch backend's bf16 masters, grad clipping and
NaN skipping apply as in the RL learner.
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from rl.algorithms import PolicyBatch, PolicyEstimates
from rl.estimators.base import EstimatorInput
from rl.learner import Learner
from rl.learner_batch import MetricLog, StepTally, rollout_batch
from rl.learner_config import LearnerConfig
from rl.masking import sample_seed
from rl.preference_pairs import PreferencePair, pair_samples
from rl.reference import reference_on_device
from rollout.models.layout import RowPacking
from rollout.models.policy import DiffusionPolicy

__all__ = ["PREFERENCE_ALGORITHMS", "PreferenceLearner", "pair_plan"]

PREFERENCE_ALGORITHMS = ("vrpo", "dtrpo")
REFERENCE_LOGP = ("model", "stored")
STORED_REFERENCE_ESTIMATORS = ("remasked_step", "trajectory")  # score each token in its decoding context


def pair_plan(num_pairs: int, *, mu: int, pairs_per_micro: int, grad_accum: int | None, shuffle: bool,
              seed: int) -> list[list[list[list[int]]]]:
    """[inner iteration][minibatch][micro-batch] -> pair indices; the order shuffled per iteration (explicit
    generator) when `shuffle`."""
    if num_pairs < 1 or pairs_per_micro < 1 or mu < 1:
        raise ValueError(f"pair_plan: need num_pairs, micro_batch_size, mu >= 1 (got {num_pairs}, "
                         f"{pairs_per_micro}, {mu})")
    per_step = num_pairs if grad_accum is None else pairs_per_micro * grad_accum
    gen = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(mu):
        order = torch.randperm(num_pairs, generator=gen).tolist() if shuffle else list(range(num_pairs))
        minibatches = []
        for start in range(0, num_pairs, per_step):
            chunk = order[start:start + per_step]
            minibatches.append([chunk[i:i + pairs_per_micro] for i in range(0, len(chunk), pairs_per_micro)])
        plan.append(minibatches)
    return plan


def check_stored_reference(samples) -> None:
    """One line naming the first trajectory whose recorded log-probs are not the reference's own raw ones."""
    for s in samples:
        t, sp = s.trajectory, s.trajectory.sampling
        why = None
        if t.policy_version != 0:
            why = f"was decoded by policy version {t.policy_version}, not the reference (version 0)"
        elif float(sp.get("temperature", 1.0)) != 1.0 or int(sp.get("top_k", 0) or 0) != 0 \
                or float(sp.get("top_p", 1.0)) != 1.0:
            why = (f"was sampled at temperature {sp.get('temperature')}, top_k {sp.get('top_k')}, top_p "
                   f"{sp.get('top_p')}: its log-probs are not the raw ones")
        if why is not None:
            raise ValueError(f"algorithm.reference_logp 'stored': trajectory {t.request_id} {why}; use 'model'")


def stored_reference(est, recorded: list[torch.Tensor]) -> torch.Tensor:
    """B_ref from recorded log-probs: the estimator's per-token weights (remasked_step: S_b on the scored tokens;
    trajectory: 1 on every token) times the recorded log-prob, over the counted tokens."""
    weights = est.extra.get("remask_weights")
    if weights is None:
        weights = torch.ones_like(est.token_logp)
    out = []
    for r, logp in enumerate(recorded):
        n = logp.numel()
        w = torch.where(est.token_mask[r, :n], weights[r, :n], torch.zeros_like(weights[r, :n]))
        out.append((w * logp.to(w)).sum())
    return torch.stack(out)


def rows_of(pairs: list[int]) -> list[int]:
    return [r for p in pairs for r in (2 * p, 2 * p + 1)]


class PreferenceLearner(Learner):
    """Learner for DPO-style losses over preference pairs (module doc)."""

    def __init__(self, policy: DiffusionPolicy, config: LearnerConfig, *, ref_policy: DiffusionPolicy | None = None,
                 antithetic: bool = True, reference_logp: str = "model"):
        if config.algorithm not in PREFERENCE_ALGORITHMS:
            raise ValueError(f"preference learner: algorithm {config.algorithm!r} is not a preference loss "
                             f"({', '.join(PREFERENCE_ALGORITHMS)})")
        if config.value is not None:
            raise ValueError("preference learner: no value model (DPO has no advantages to estimate)")
        if reference_logp not in REFERENCE_LOGP:
            raise ValueError(f"preference learner: reference_logp {reference_logp!r} not in {REFERENCE_LOGP}")
        if reference_logp == "stored" and config.estimator not in STORED_REFERENCE_ESTIMATORS:
            raise ValueError(f"preference learner: reference_logp 'stored' needs an estimator that scores tokens in "
                             f"their decoding context ({', '.join(STORED_REFERENCE_ESTIMATORS)}), not "
                             f"{config.estimator!r}")
        if reference_logp == "model" and config.reference_model is False:
            raise ValueError("preference learner: DPO needs the reference model (learner.reference_model: false)")
        config.reference_model = reference_logp == "model"
        self.reference_logp = reference_logp
        super().__init__(policy, config, ref_policy=ref_policy)
        if self.backend.world_size != 1:
            raise ValueError("preference learner: one process only for now (learner.num_workers: 1)")
        self.antithetic = bool(antithetic)

    def mask_seeds(self) -> tuple[int, int]:
        """(policy seed, reference seed) of this update's masks: equal under antithetic sampling."""
        ref = self._mask_seed if self.antithetic else sample_seed(self._mask_seed, "reference-independent")
        return self._mask_seed, ref

    def _estimate_with(self, policy, inp: EstimatorInput, key: int, seed: int):
        packing = {} if self.config.pack_tokens is None else {"packing": RowPacking(self.config.pack_row_tokens)}
        with self._autocast():
            return self.estimator(policy, inp, seed=seed, inner_iter=key, temperature=self.score_temperature,
                                  return_entropy=self.config.entropy, **packing, **self.config.estimator_params)

    def update(self, pairs: list[PreferencePair]) -> dict[str, float]:  # type: ignore[override]
        cfg, start = self.config, time.perf_counter()
        samples = pair_samples(pairs)
        batch = rollout_batch(samples)
        self._mask_seed = sample_seed(cfg.seed, "masks", self.updates)
        policy_seed, ref_seed = self.mask_seeds()
        plan = pair_plan(len(pairs), mu=cfg.mu, pairs_per_micro=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                         shuffle=cfg.shuffle, seed=sample_seed(cfg.seed, "shuffle", self.updates))
        counters = {"forwards": 0, "forwards_ref": 0}
        self._set_mode(train=False)
        if self.reference_logp == "stored":
            check_stored_reference(samples)
            ref_seq = {}
        else:
            ref_seq = self._reference_scores(batch.inp, plan, ref_seed, counters)
        t_ref = time.perf_counter() - start
        log, tally = MetricLog(), StepTally()
        self._set_mode(train=True)
        for it, minibatches in enumerate(plan):
            key = self._mask_iter(it)
            for micros in minibatches:
                norm = float(sum(len(m) for m in micros))  # pairs in this minibatch: the loss is their mean
                for k, micro in enumerate(micros):
                    rows = rows_of(micro)
                    inp = batch.inp.select(rows)
                    est = self._estimate_with(self.policy, inp, key, policy_seed)
                    counters["forwards"] += est.forwards
                    pb = PolicyBatch(advantages=torch.tensor([1.0, -1.0] * len(micro), device=self.device),
                                     token_mask=est.token_mask, loss_normalizer=norm)
                    if self.reference_logp == "stored":
                        ref = stored_reference(est, [batch.rollout_logp[r] for r in rows])
                    else:
                        ref = torch.stack([ref_seq[(key, r)] for r in rows]).to(self.device)
                    pe = PolicyEstimates(seq_logp=est.seq_logp, seq_ref_logp=ref, entropy=est.entropy)
                    loss, metrics = self.loss_fn(pb, pe, self.loss_config)
                    log.add(metrics)
                    self.backend.backward(loss, boundary=k == len(micros) - 1)
                self._optimizer_step(tally)
        out = log.means()
        out.update(self._finish_update(tally, len(samples)))
        versions = [float(s.trajectory.policy_version) for s in samples]
        out.update({
            "data_version_mean": sum(versions) / len(versions),
            "time_s": time.perf_counter() - start, "time_ref_s": t_ref,
            "forwards": float(counters["forwards"] + counters["forwards_ref"]),
            "forwards_ref": float(counters["forwards_ref"]),
        })
        return out

    def _reference_scores(self, inp: EstimatorInput, plan, seed: int, counters: dict) -> dict:
        """(mask key, row) -> the reference's sequence estimate, on the micro-batches training will use."""
        scores: dict[tuple[int, int], torch.Tensor] = {}
        ref_policy, adapters_off = self._reference()
        offloaded = self.config.offload_reference and self._ref_engine is None
        ref_module = self.ref_policy.model if self.ref_policy is not None else None
        with torch.no_grad(), reference_on_device(ref_module, self.device, offload=offloaded):
            for it, minibatches in enumerate(plan):
                key = self._mask_iter(it)
                for micro in (m for mb in minibatches for m in mb):
                    rows = [r for r in rows_of(micro) if (key, r) not in scores]
                    if not rows:
                        continue
                    with self._ref_context() if adapters_off else nullcontext():
                        est = self._estimate_with(ref_policy, inp.select(rows), key, seed)
                    counters["forwards_ref"] += est.forwards
                    for j, r in enumerate(rows):
                        scores[(key, r)] = est.seq_logp[j].detach()
        return scores
