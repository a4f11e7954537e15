"""Each algorithm's published defaults, in one table, and the rule for when a run needs a reference model.

The one source of these numbers (shared/ALGORITHMS.md gives the papers and code they were read from):
- `loss`: the loss registry entry's defaults (`rl.algorithms.LOSSES`, merged by `make_loss_config`); the recipe's
  algorithm section (launch/recipe_sections.py) takes its field defaults from here too;
- `learner`, `rollout`: what a recipe's `learner.*` / `rollout.*` left at None becomes (else `GENERIC`);
- `group`: the group-relative settings outside the loss (advantage, filter bounds, length-limit rule);
- `value_model`: TraceRL's value model.
Plain data and no imports beyond the standard library, so that recipe validation (launch/) reads it without torch.
Layering: rl holds the numbers, launch reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["ALGORITHM_DEFAULTS", "AlgorithmDefaults", "GENERIC", "needs_reference_model"]


def _frozen(values: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class AlgorithmDefaults:
    loss: Mapping[str, Any]  # rl.algorithms.LossConfig fields
    learner: Mapping[str, Any] = field(default_factory=_frozen)  # recipe learner.* (lr, betas, mu, ...)
    rollout: Mapping[str, Any] = field(default_factory=_frozen)  # recipe rollout.* (samples_per_prompt, temperature)
    group: Mapping[str, Any] = field(default_factory=_frozen)  # advantage, accuracy_lo/hi, length_limit_margin
    value_model: Mapping[str, Any] = field(default_factory=_frozen)  # TraceRL: lr, clip, gamma, lam
    published: bool = True  # False: no published figures; these are the project's own choices

    def __post_init__(self) -> None:
        for name in ("loss", "learner", "rollout", "group", "value_model"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


# Group-relative advantage without filtering or length rule: d1, GDPO, CJ-GRPO, wd1, SPG (DiffuCoder: leave-one-out).
_MEAN_CENTERED = {"advantage": "mean_centered", "accuracy_lo": None, "accuracy_hi": None, "length_limit_margin": None}

ALGORITHM_DEFAULTS: Mapping[str, AlgorithmDefaults] = MappingProxyType({
    # d1: one-step estimator; eps 0.5, beta 0.04 (k3 to the reference), |o_i|-normalised token sum.
    "diffu_grpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.5, "clip_eps_high": 0.5, "beta": 0.04, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "token_mean"},
        learner={"lr": 3e-6, "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 0.2, "mu": 12},
        rollout={"samples_per_prompt": 6, "temperature": 0.9}, group=_MEAN_CENTERED),
    # GDPO: sequence ratio on an SDMC ELBO over the tokens through the first EOS / the generation length; beta 0.
    "gdpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.5, "clip_eps_high": 0.5, "beta": 0.0, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "seq_mean_token_mean", "seq_length": "generation", "observed_only": False},
        learner={"lr": 3e-7, "mu": 12}, rollout={"samples_per_prompt": 6}, group=_MEAN_CENTERED),
    # CJ-GRPO (yjyddq/EOSER-ASS-RL train.yaml): every token unmasked at a step, EOS padding included, pooled across
    # the batch per step, then the mean over steps; eps 0.5, beta 0.04 (k3 to the reference); temperature 1.0.
    "cj_grpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.5, "clip_eps_high": 0.5, "beta": 0.04, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "step_pooled_mean", "token_set": "response"},
        rollout={"temperature": 1.0}, group=_MEAN_CENTERED),
    # TraceRL (dLLM-RL train_trado_policy.py): rho = exp(clamp(., -10, 10)), eps 0.2, beta 0.01 k3 against the OLD
    # policy with its exponent clamped to +-10; z-scored advantages, groups with accuracy outside [0.2, 0.8]
    # dropped, responses within 5 tokens of the length limit count as wrong (reward/rl_reward.py).
    "tracerl": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.01, "kl_reference": "old", "kl_estimator": "k3",
              "ratio_clamp": 10.0, "kl_log_ratio_clamp": 10.0, "loss_agg": "token_mean"},
        learner={"lr": 1e-6, "grad_accum": 32}, rollout={"samples_per_prompt": 16, "temperature": 1.0},
        group={"advantage": "zscore", "accuracy_lo": 0.2, "accuracy_hi": 0.8, "length_limit_margin": 5},
        value_model={"lr": 5e-6, "clip": 0.2, "gamma": 1.0, "lam": 1.0}),
    # DiffuCoder (config_coupled_code.yaml): coupled estimator; eps 0.5, beta 0.01, leave-one-out advantages
    # R_i - mean of the other G - 1 (coupled_grpo.py hard-codes leave_one_out = True; scale_rewards false: no std);
    # its cosine schedule with a 0.1 floor is set in the recipe.
    "coupled_grpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.5, "clip_eps_high": 0.5, "beta": 0.01, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "token_mean"},
        learner={"lr": 1e-6, "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 0.2, "mu": 2},
        rollout={"samples_per_prompt": 10, "temperature": 1.0},
        group={**_MEAN_CENTERED, "advantage": "leave_one_out"}),
    # wd1 (xiaohangt/wd1): ratio-free weighted log-likelihood, no KL; d1's optimiser and sampling (wd1/train.yaml,
    # run/wll_NP_gsm8k.sh NUM_ITER 12; temperature: its config's default 0.9).
    "wd1": AlgorithmDefaults(loss={"beta": 0.0, "loss_agg": "seq_mean_token_sum"},
                             learner={"lr": 3e-6, "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 0.2,
                                      "mu": 12},
                             rollout={"samples_per_prompt": 6, "temperature": 0.9}, group=_MEAN_CENTERED),
    # SPG: ELBO for A > 0, EUBO (beta_E 1.5) for A <= 0, mixed 0.5; per-token bounds over the tokens through EOS.
    "spg": AlgorithmDefaults(
        loss={"beta": 0.0, "beta_e": 1.5, "mix": 0.5, "length_normalize": True, "seq_length": "valid",
              "observed_only": False, "loss_agg": "token_mean"},
        # spg/slurm_scripts/train.yaml (d1's optimiser) and spg_mix/*.sbatch (NUM_ITER 4, 6 generations).
        learner={"lr": 3e-6, "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 0.2, "mu": 4},
        rollout={"samples_per_prompt": 6, "temperature": 0.9}, group=_MEAN_CENTERED),
    # ESPO (ML-GSAI/ESPO recipes/train.yaml + run_gsm8k_llada.sh): ratio exp((ELBO - ELBO_old) / L) over every
    # generated token (EOS padding included, L the generation length), eps 0.2, beta 1e-3 on the k2 sequence KL
    # 0.5 (ELBO - ELBO_ref)^2 / L, mean over sequences; NUM_ITER 8, lr 3e-6, betas (0.9, 0.99), weight decay 0.01,
    # grad clip 0.2, 6 generations, temperature 1.0, leave-one-out advantages without std scaling.
    "espo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 1e-3, "kl_reference": "ref", "kl_estimator": "k2",
              "loss_agg": "seq_mean_token_mean", "seq_length": "generation", "token_set": "response",
              "observed_only": False, "length_normalize": True},
        learner={"lr": 3e-6, "betas": (0.9, 0.99), "weight_decay": 0.01, "grad_clip": 0.2, "mu": 8},
        rollout={"samples_per_prompt": 6, "temperature": 1.0},
        group={**_MEAN_CENTERED, "advantage": "leave_one_out"}),
    # BGPO (THU-KEG/BGPO, 2510.11683): the linear lower bound of the ELBO objective, one Monte Carlo draw per backward;
    # on-policy (mu 1), no KL. lr 5e-7: the authors' model card (huggingface THU-KEG/LLaDA-8B-BGPO-code: lr 5e-7,
    # batch 16, MC sample size n_t 16, 512 tokens, 512 steps, block 32). The paper's method section and code could
    # not be read here (docs/FIDELITY.md), so the loss is not claimed as published.
    "bgpo": AlgorithmDefaults(
        loss={"beta": 0.0, "loss_agg": "seq_mean_token_mean", "seq_length": "valid", "observed_only": False,
              "length_normalize": False, "per_draw_backward": True},
        learner={"lr": 5e-7, "mu": 1}, group=_MEAN_CENTERED, published=False),
    # EBPO (LLaDA2.1, 2602.08676): sequence ratio exp(sum over blocks of block-ELBO differences), PPO clip; no code
    # released; the paper gives no loss figures we could read (docs/FIDELITY.md): PPO's eps 0.2, no KL.
    "ebpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.0, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "seq_mean_token_mean", "seq_length": "valid", "observed_only": False,
              "length_normalize": False},
        group=_MEAN_CENTERED, published=False),
    # Preference methods (DPO on diffusion likelihoods; rl/algorithms/preference.py): `beta` is DPO's beta and the
    # reference is the frozen initial policy. VRPO (LLaDA 1.5, 2505.19223): the DPO-E loss, budget n = n_t x n_yt
    # with n_t = n, n_yt = 1, antithetic policy/reference masks, the ELBO in the paper's time form (recipes:
    # estimator mc_elbo form time; project page ml-gsai.github.io/LLaDA-1.5-Demo and a review quoting the paper's
    # estimator, docs/FIDELITY.md); its numbers (beta, lr, n) were not read: DPO's usual beta 0.1 and ours.
    "vrpo": AlgorithmDefaults(loss={"beta": 0.1, "kl_reference": "ref"}, learner={"mu": 1}, published=False),
    # dTRPO (2603.18806, ICML'26): DPO on one-forward re-masked trajectory estimates, offline pairs from stored
    # rollouts; only the abstract and project page were readable here (no code snapshot): numbers are ours.
    "dtrpo": AlgorithmDefaults(loss={"beta": 0.1, "kl_reference": "ref"}, learner={"mu": 1}, published=False),
    # AGRPO (probablyabot/agrpo train.yaml @98f1182): eps 0.2, beta 0, every token of a drawn step (EOS included),
    # summed and averaged over sequences; log-probs at the sampling temperature; R - mean advantages (no std);
    # lr 5e-6, betas (0.9, 0.99), wd 0.01, clip 1.0, one inner iteration; 8 samples at temperature 0.6.
    "agrpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.0, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "seq_mean_token_sum", "token_set": "response", "logp_temperature": "rollout"},
        learner={"lr": 5e-6, "betas": (0.9, 0.99), "weight_decay": 0.01, "grad_clip": 1.0, "mu": 1},
        rollout={"samples_per_prompt": 8, "temperature": 0.6}, group=_MEAN_CENTERED),
    # MDPO (autonomousvision/mdpo recipes/LLaDA-Instruct/mdpo/config_demo.yaml @e6ae439): eps 0.2 (TRL's default),
    # beta 0 (k2 when on), intermediate states' masked tokens averaged per (sample, step), log-probs at the sampling
    # temperature; lr 1e-5 constant, one inner iteration, G 4, temperature 0.1; 16 trained steps per sample.
    "mdpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.0, "kl_reference": "ref", "kl_estimator": "k2",
              "loss_agg": "seq_mean_token_mean", "token_set": "response", "logp_temperature": "rollout"},
        learner={"lr": 1e-5, "mu": 1}, rollout={"samples_per_prompt": 4, "temperature": 0.1},
        group={**_MEAN_CENTERED, "train_steps": 16}),
    # d-TreeRPO (THU-BPM/d-TreeRPO dtreerpo/slurm_scripts/dtreerpo.yaml @3eb6f21): eps 0.4, beta 0.01 (k3 to the
    # reference), per-edge token mean then mean over edges, raw-logit log-probs; d1's optimiser with lr 3e-5, 12
    # inner iterations; a tree of 4 root children x 4 branches over 2 levels = 16 leaves; temperature 0.9 (its
    # config default); self-distillation lambda_max 3e-3, gamma 2, tau_max 2, beta 0.7 over max_steps 30000.
    "dtreerpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.4, "clip_eps_high": 0.4, "beta": 0.01, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "seq_mean_token_mean", "token_set": "response", "distill_lambda_max": 3e-3,
              "distill_gamma": 2.0, "distill_tau_max": 2.0, "distill_beta": 0.7, "distill_total_steps": 30000},
        learner={"lr": 3e-5, "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 0.2, "mu": 12},
        rollout={"samples_per_prompt": 16, "temperature": 0.9},
        group={**_MEAN_CENTERED, "num_tree_samples": 4, "tree_branch_factor": 4, "tree_contraction_factor": 2}),
    # UniGRPO-style random masking: no published loss figures; PPO's eps 0.2 and no KL (so no reference model).
    "random_mask_grpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.0, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "token_mean"},
        group=_MEAN_CENTERED, published=False),
    # JustGRPO (LeapLabTHU/JustGRPO grpo.py, train.py): AR-order rollouts, exact log-probs; eps 0.2, no KL, every
    # generated position (EOS padding included) / (gen_length * samples with A != 0); AdamW lr 5e-6, betas
    # (0.9, 0.999), no weight decay, grad clip 1.0, one inner step; 16 samples (8 x repeat_times 2) at T = 1.
    "justgrpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.0, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "seq_mean_token_mean", "token_set": "response"},
        learner={"lr": 5e-6, "betas": (0.9, 0.999), "weight_decay": 0.0, "grad_clip": 1.0, "mu": 1},
        rollout={"samples_per_prompt": 16, "temperature": 1.0},
        group={"advantage": "zscore", "accuracy_lo": None, "accuracy_hi": None, "length_limit_margin": None}),
    # IGPO (facebookresearch/igpo run_igpo.sh + train.yaml): d1's clipped token loss (eps 0.2 / 0.2, beta 0.01 k3
    # to the reference) over every completion position but pre-filled hints, / their count; A = R - mean; AdamW lr
    # 5e-7, betas (0.9, 0.99), weight decay 0.1, grad clip 0.2, mu 4; 8 samples at temperature 1.2.
    "igpo": AlgorithmDefaults(
        loss={"clip_eps_low": 0.2, "clip_eps_high": 0.2, "beta": 0.01, "kl_reference": "ref", "kl_estimator": "k3",
              "loss_agg": "token_mean", "token_set": "response"},
        learner={"lr": 5e-7, "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 0.2, "mu": 4},
        rollout={"samples_per_prompt": 8, "temperature": 1.2}, group=_MEAN_CENTERED),
})

# What a recipe's learner.* / rollout.* left at None becomes when the algorithm publishes no value for it.
GENERIC: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "learner": _frozen({"lr": 1e-6, "betas": (0.9, 0.999), "weight_decay": 0.0, "grad_clip": 1.0, "mu": 1,
                        "grad_accum": 1}),
    "rollout": _frozen({"samples_per_prompt": 8, "temperature": 1.0}),
})


def needs_reference_model(beta: float, kl_reference: str) -> bool:
    """Whether the loss reads a frozen reference policy: a KL penalty (beta > 0) measured against `ref` (against
    `old`, the rollout policy, it needs none)."""
    return beta > 0 and kl_reference == "ref"
