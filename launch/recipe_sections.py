"""The recipe's algorithm sections: one class per algorithm, discriminated by `name` (estimators:
launch/recipe_estimators.py).

Each algorithm carries only its own parameters, with its authors' published defaults (shared/ALGORITHMS.md);
`loss_params()` names them as rl.algorithms.LossConfig does. launch/recipe.py assembles these into the Recipe;
only pydantic and the light table rl/published.py are imported here.

Published defaults are not written here: a section declared `published="tracerl"` (or `("tracerl", "group")`)
takes the default of every field named in that part of rl/published.py's entry from there, the one table the
loss registry reads too: a default written below for a field that table names is overridden by it.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rl.published import ALGORITHM_DEFAULTS

__all__ = ["AlgorithmSection", "Fraction", "Section"]

_ALGORITHM_PARTS = ("loss", "group")  # the parts of an entry that an algorithm section holds


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init_subclass__(cls, published: str | tuple[str, ...] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

    @classmethod
    def __pydantic_init_subclass__(cls, published: str | tuple[str, ...] | None = None, **kwargs: Any) -> None:
        # Called once pydantic has built the class's fields (after __init_subclass__, which cannot change them).
        super().__pydantic_init_subclass__(**kwargs)
        if published is not None:
            name, *parts = (published,) if isinstance(published, str) else published
            _adopt_published(cls, name, tuple(parts) or _ALGORITHM_PARTS)


def _adopt_published(cls: type[Section], algorithm: str, parts: tuple[str, ...]) -> None:
    """Set the defaults of `cls`'s fields named in `parts` of rl/published.py's entry for `algorithm`."""
    entry = ALGORITHM_DEFAULTS[algorithm]
    values = {key: value for part in parts for key, value in getattr(entry, part).items()
              if key in cls.__pydantic_fields__}
    for key, value in values.items():
        field = copy.copy(cls.__pydantic_fields__[key])
        field.default = value
        cls.__pydantic_fields__[key] = field
    if values:
        cls.model_rebuild(force=True)


Fraction = Annotated[float, Field(ge=0, le=1)]


# -------------------------------------------------------------------------------------------------- algorithm
class FilterSection(Section):
    """Which groups to drop before the loss: keep groups with accuracy_lo <= accuracy <= accuracy_hi."""

    drop_zero_variance: bool = False
    accuracy_lo: Fraction | None = None
    accuracy_hi: Fraction | None = None


class TraceRLFilter(FilterSection, published=("tracerl", "group")):
    """TraceRL's filter bounds as class defaults, so that a recipe setting one bound keeps the other."""


class ValueModelSection(Section, published=("tracerl", "value_model")):
    """TraceRL's value model (published, rl/published.py: value lr 5e-6, clip 0.2, gamma = lambda = 1)."""

    lr: float = Field(1e-6, gt=0)
    clip: float = Field(1.0, gt=0)
    gamma: Fraction = 1.0
    lam: Fraction = 1.0
    # "separate" (TraceRL): a value model of its own, started from `path` or a copy of the policy; "shared": a value
    # head on the policy's own trunk (no extra forwards), its loss times `coef` added to the policy loss.
    trunk: Literal["separate", "shared"] = "separate"
    coef: float = Field(1.0, gt=0)  # shared trunk only
    path: str | None = Field(None, min_length=1)  # separate trunk to start from; None: a copy of the policy


AdvantageKind = Literal["mean_centered", "leave_one_out", "zscore"]
LossAgg = Literal["token_mean", "seq_mean_token_sum", "fixed_length"]
# Temperature of the learner's log-probs: "raw" logits, as every reference computes them; "rollout": the sampling
# temperature (the rollout's own distribution: learner and rollout log-probs agree, ratios see the policy that
# sampled; off-policy behaviour log-probs need it).
LogpTemperature = Literal["raw", "rollout"]
SeqLength = Literal["generation", "valid"]  # the L of per-token normalised sequence ELBOs (rl.algorithms)

# Section fields that are not loss parameters (advantages, filters, the value model and reward shaping).
_NOT_LOSS = {"name", "advantage", "filter", "value_model", "length_limit_margin", "inpaint"}


class _GroupRelative(Section):
    name: str  # declared first so that dumps read `name` first; each algorithm narrows it to its Literal
    advantage: AdvantageKind = "mean_centered"  # A = R - mean(R) (d1, GDPO, CJ-GRPO, wd1, SPG)
    filter: FilterSection = FilterSection()
    logp_temperature: LogpTemperature = "raw"
    # A response within this many tokens of rollout.max_tokens counts as wrong (reward 0) before advantages and
    # filters (TraceRL: 5, as dLLM-RL's reward/rl_reward.py); None: no such rule.
    length_limit_margin: int | None = Field(None, ge=0)

    def loss_params(self) -> dict[str, Any]:
        """The loss's own parameters, named as rl.algorithms.LossConfig names them (advantage, filter, the value
        model and the length-limit rule are not part of the loss)."""
        return self.model_dump(exclude=_NOT_LOSS)


class _ClippedPolicyGradient(_GroupRelative):
    clip_eps_low: float = Field(0.2, gt=0)  # ratio clipped to [1 - low, 1 + high]
    clip_eps_high: float = Field(0.2, gt=0)
    beta: float = Field(0.0, ge=0)  # KL coefficient
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_reference: Literal["ref", "old"] = "ref"  # old: KL to the rollout policy (no reference model needed)
    ratio_clamp: float | None = Field(None, gt=0)  # clamp of the log-ratio before exp (TraceRL: 10)
    kl_log_ratio_clamp: float | None = Field(None, gt=0)  # clamp of k3's exponent (TraceRL: 10)


class DiffuGRPO(_ClippedPolicyGradient, published="diffu_grpo"):
    """d1: token-level clipped ratio on one-step log-probs. eps 0.5, beta 0.04 (k3 to the reference)."""

    name: Literal["diffu_grpo"] = "diffu_grpo"
    loss_agg: LossAgg = "token_mean"  # d1 divides by the group's total token count


class GDPO(_ClippedPolicyGradient, published="gdpo"):
    """Sequence-level ratio exp((ELBO_theta - ELBO_old) / L) on an SDMC ELBO over the tokens through the first EOS,
    L the generation length (GDPO's code). eps 0.5, beta 0."""

    name: Literal["gdpo"] = "gdpo"
    seq_length: SeqLength = "generation"


class CJGRPO(_ClippedPolicyGradient, published="cj_grpo"):
    """Ratio per denoising step along the recorded trajectory; every token unmasked at a step (EOS padding
    included), pooled across the batch per step, then the mean over steps (yjyddq/EOSER-ASS-RL). eps 0.5,
    beta 0.04 as its train.yaml. token_set "through_eos" is the option that stops at the first EOS."""

    name: Literal["cj_grpo"] = "cj_grpo"
    token_set: Literal["through_eos", "response"] = "response"
    loss_agg: Literal["step_pooled_mean", "seq_mean_step_mean"] = "step_pooled_mean"  # the latter: per sample


class TraceRL(_ClippedPolicyGradient, published="tracerl"):
    """Token-level PPO clip along the trajectory. eps 0.2, beta 0.01 k3 against the OLD policy, log-ratio and k3
    exponent clamped to +-10, z-scored advantages, responses within 5 tokens of the length limit count as wrong,
    groups with accuracy outside [0.2, 0.8] dropped (dLLM-RL)."""

    name: Literal["tracerl"] = "tracerl"
    filter: TraceRLFilter = TraceRLFilter()
    loss_agg: LossAgg = "token_mean"
    value_model: ValueModelSection | None = None


class CoupledGRPO(_ClippedPolicyGradient, published="coupled_grpo"):
    """DiffuCoder: token-level clip + beta k3 on the coupled estimator. eps 0.5, beta 0.01, leave-one-out advantages
    R_i - mean of the other rewards (coupled_grpo.py: leave_one_out = True; config_coupled_code.yaml: scale_rewards
    false); "mean_centered" (R - mean) and "zscore" (divided by the group std) are options."""

    name: Literal["coupled_grpo"] = "coupled_grpo"
    loss_agg: LossAgg = "token_mean"


class WD1(_GroupRelative, published="wd1"):
    """Ratio-free: -sum softmax(A) log pi + sum softmax(-A) log pi on one-step log-probs, log pi(o) the sum of the
    sequence's token log-probs (the paper and xiaohangt/wd1)."""

    name: Literal["wd1"] = "wd1"


class SPG(_GroupRelative, published="spg"):
    """-A log pi_seq with an ELBO for A > 0 and an EUBO (beta_e 1.5) for A <= 0; mix = weight of the EUBO."""

    name: Literal["spg"] = "spg"
    beta_e: float = Field(1.0, gt=0)
    mix: Fraction = 0.0
    seq_length: SeqLength = "valid"  # ELBO / tokens through the first EOS, never / the masked count


class RandomMaskGRPO(_ClippedPolicyGradient, published="random_mask_grpo"):
    """UniGRPO-style token-level clip on random-mask log-probs. No published loss defaults in ALGORITHMS.md:
    PPO's eps 0.2 and no KL (so no reference model) unless the recipe says otherwise."""

    name: Literal["random_mask_grpo"] = "random_mask_grpo"
    loss_agg: LossAgg = "token_mean"


class ESPO(_ClippedPolicyGradient, published="espo"):
    """Sequence ratio exp((ELBO - ELBO_old) / L) over every generated token, L the generation length, eps 0.2,
    beta 1e-3 on the k2 sequence KL 0.5 (ELBO - ELBO_ref)^2 / L (ML-GSAI/ESPO), leave-one-out advantages."""

    name: Literal["espo"] = "espo"
    seq_length: SeqLength = "generation"
    token_set: Literal["through_eos", "response"] = "response"  # ESPO's ELBO covers the EOS padding too


class BGPO(_GroupRelative, published="bgpo"):
    """Linear lower bound of the ELBO objective (A (1 + delta_k) for A > 0, A exp(delta_k) otherwise, mean over the
    Monte Carlo draws), backpropagated one draw at a time (constant memory in the number of draws)."""

    name: Literal["bgpo"] = "bgpo"
    length_normalize: bool = False  # divide each draw's log-ratio by L (an option)
    per_draw_backward: bool = True  # False: every draw in one graph (same gradient, memory grows with draws)


class EBPO(_ClippedPolicyGradient, published="ebpo"):
    """LLaDA2.1: sequence ratio exp(sum over blocks of block-ELBO differences) on block models, PPO clip."""

    name: Literal["ebpo"] = "ebpo"
    length_normalize: bool = False  # divide the log-ratio by L (an option; the paper does not)


class _Preference(Section):
    """DPO over preference pairs (rl/algorithms/preference.py), trained with trainer.mode: offline (no rollout)."""

    name: str
    beta: float = Field(0.1, gt=0)  # DPO's beta (the implicit reward's scale), not a KL coefficient
    # The reference's estimate of a response reuses the policy's masks / re-masked state (VRPO's antithetic
    # sampling); false draws them independently (an option, to compare).
    antithetic: bool = True

    def loss_params(self) -> dict[str, Any]:
        return {"beta": self.beta}


class VRPO(_Preference, published="vrpo"):
    """LLaDA 1.5: DPO on ELBO estimates, budget n = estimator.mc_num timesteps with one mask each (the optimal
    allocation), antithetic policy / reference masks. Pairs: data.preferences (jsonl: prompt, chosen, rejected)."""

    name: Literal["vrpo"] = "vrpo"


class DTRPO(_Preference, published="dtrpo"):
    """dTRPO: DPO on trajectory log-likelihoods from one forward of a re-masked final state (estimator
    remasked_step), offline from a run's trajectory store (data.trajectories): best vs worst response of each
    stored group whose rewards differ by more than min_margin."""

    name: Literal["dtrpo"] = "dtrpo"
    min_margin: float = Field(0.0, ge=0)
    # "model": the frozen reference scores the re-masked states; "stored": the log-probs the rollout recorded are
    # the reference's (data decoded by version 0 at temperature 1; checked), no reference forward at all.
    reference_logp: Literal["model", "stored"] = "model"


class JustGRPO(_ClippedPolicyGradient, published="justgrpo"):
    """Plain GRPO in AR order with exact log-probs (LeapLabTHU/JustGRPO): eps 0.2, no KL, every generated position
    (EOS padding included) over gen_length x the samples with A != 0, A = (R - mean) / (unbiased std + 1e-4).
    Needs rollout.remasking left_to_right (and stop_at_eos false, as its rollouts) and estimator ar_exact."""

    name: Literal["justgrpo"] = "justgrpo"
    advantage: Literal["zscore"] = "zscore"  # its own z-score (rl/algorithms/justgrpo.py)
    token_set: Literal["through_eos", "response"] = "response"
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"


class InpaintSection(Section):
    """IGPO's hints (rl/inpainting.py; defaults of the released run, facebookresearch/igpo run_igpo.sh)."""

    reference_field: str = Field("reference_trace", min_length=1)  # data column of the trace; "answer": the answer
    trigger: Literal["all_wrong", "zero_advantage"] = "all_wrong"  # groups with no correct response (IGPO)
    ratio_low: Fraction = 0.2  # inpainting ratio eta ~ U[low, high] per sample
    ratio_high: Fraction = 0.6
    min_chunk: int = Field(5, ge=1)  # trace chunk sizes U{min..max}
    max_chunk: int = Field(10, ge=1)
    max_spacing: int = Field(100, ge=0)
    free_tail: int = Field(30, ge=0)  # last canvas positions never pre-filled
    max_replacements: int = Field(4, ge=1)  # correct hinted samples swapped into a group

    def config(self):
        from rl.inpainting import InpaintConfig

        return InpaintConfig(**self.model_dump(exclude={"reference_field"}))


class IGPO(_ClippedPolicyGradient, published="igpo"):
    """d1's token-level clip on one-step log-probs (eps 0.2, beta 0.01 k3 to the reference, A = R - mean, every
    completion position) plus inpainting: groups with no correct response are regenerated with parts of the row's
    reference trace pre-filled, and correct regenerations replace up to 4 of the group's samples; pre-filled tokens
    are never counted in the loss."""

    name: Literal["igpo"] = "igpo"
    token_set: Literal["through_eos", "response"] = "response"
    loss_agg: LossAgg = "token_mean"
    inpaint: InpaintSection = InpaintSection()
    # Share of each sample's hint tokens trained on after all, those of highest entropy under the old policy (the
    # released code: 0.2); 0 (default, issue 15): hints are never trained on as the policy's choice.
    hint_entropy_keep: Fraction = 0.0
    # GSPO's sequence ratio (rl/algorithms/igpo.py): "response" = the released run's use_gspo (every response
    # position, hints included, / generation length); "counted" = over the counted tokens only; "off" = d1's token
    # ratio (default).
    sequence_ratio: Literal["off", "response", "counted"] = "off"


class AGRPO(_ClippedPolicyGradient, published="agrpo"):
    """AGRPO: token-level clip on individual denoising steps drawn with importance weights (estimator
    sampled_steps), every token of a drawn step counted, summed per sequence. eps 0.2, beta 0 (probablyabot/agrpo)."""

    name: Literal["agrpo"] = "agrpo"
    token_set: Literal["through_eos", "response"] = "response"
    loss_agg: LossAgg = "seq_mean_token_sum"


class MDPO(_ClippedPolicyGradient, published="mdpo"):
    """MDPO: the clipped token loss on intermediate denoising states, per-step rewards of each step's decoded
    prediction turned into per-step advantages (rl/step_samples.py); each rollout trains on its `train_steps` steps
    of largest |advantage|. eps 0.2, beta 0 (k2 when on) (autonomousvision/mdpo)."""

    name: Literal["mdpo"] = "mdpo"
    token_set: Literal["response"] = "response"
    loss_agg: Literal["seq_mean_token_mean"] = "seq_mean_token_mean"
    train_steps: int = Field(16, ge=1)  # the reference's sample_train_steps

    def loss_params(self) -> dict[str, Any]:
        return self.model_dump(exclude=_NOT_LOSS | {"train_steps"})


class DTreeRPO(_ClippedPolicyGradient, published="dtreerpo"):
    """d-TreeRPO: tree rollouts (num_tree_samples root children, tree_branch_factor branches per inner node,
    tree_contraction_factor levels), node values averaged bottom-up from leaf rewards, each edge trained with its
    child's value minus its siblings' mean. eps 0.4, beta 0.01 (THU-BPM/d-TreeRPO). rollout.samples_per_prompt must
    be the number of leaves."""

    name: Literal["dtreerpo"] = "dtreerpo"
    token_set: Literal["response"] = "response"
    loss_agg: Literal["seq_mean_token_mean"] = "seq_mean_token_mean"
    num_tree_samples: int = Field(4, ge=1)
    tree_branch_factor: int = Field(4, ge=1)
    tree_contraction_factor: int = Field(2, ge=1)
    # Self-distillation toward the positive siblings' tokens (rl/algorithms/dtreerpo.py): lambda(t) = lambda_max
    # (e^{gamma t/T} - 1) / (e^gamma - 1), tau(t) = tau_max (1 - t/T)^beta, T = distill_total_steps (published:
    # 3e-3, 2, 2, 0.7, 30000); distill_lambda_max 0 turns it off.
    distill_lambda_max: float = Field(3e-3, ge=0)
    distill_gamma: float = 2.0  # any sign (the ramp's curvature), not 0 (lambda's denominator e^gamma - 1)
    distill_tau_max: float = Field(2.0, gt=0)
    distill_beta: float = Field(0.7, ge=0)  # < 0: tau(T) would be 0 raised to a negative power
    distill_total_steps: int = Field(30000, ge=1)

    @field_validator("distill_gamma")
    @classmethod
    def _gamma_not_zero(cls, gamma: float) -> float:
        if gamma == 0:
            raise ValueError("must not be 0 (lambda(t) divides by e^gamma - 1)")
        return gamma

    def loss_params(self) -> dict[str, Any]:
        return self.model_dump(exclude=_NOT_LOSS | {"num_tree_samples", "tree_branch_factor",
                                                    "tree_contraction_factor"})


AlgorithmSection = Annotated[
    DiffuGRPO | GDPO | CJGRPO | TraceRL | CoupledGRPO | WD1 | SPG | RandomMaskGRPO | ESPO | BGPO | EBPO | VRPO | DTRPO
    | JustGRPO | IGPO | AGRPO | MDPO | DTreeRPO,
    Field(discriminator="name")
]
