"""The recipe's estimator sections: one class per likelihood estimator, discriminated by `name`; each `params()`
gives the keyword options of the rl estimator of the same name (`rl.estimators.get_estimator(name)`). Only pydantic
is imported here, as in launch/recipe_sections.py (the algorithm sections and the shared `Section` base)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from launch.recipe_sections import Fraction, Section

__all__ = ["EstimatorSection"]


class _EstimatorSection(Section):
    def params(self) -> dict[str, Any]:
        """Keyword options of the rl estimator of the same name (`rl.estimators.get_estimator(name)`)."""
        return self.model_dump(exclude={"name"})


class OneStepEstimator(_EstimatorSection):
    name: Literal["one_step"] = "one_step"
    p_mask: float = Field(0.15, ge=0, lt=1)  # prompt-token masking probability (d1)
    reseed_per_update: bool = True  # d1 draws a new mask seed per inner iteration

    def params(self) -> dict[str, Any]:
        return {"p_mask": self.p_mask}  # reseeding is the learner's business (which inner_iter it passes)


class MCElboEstimator(_EstimatorSection):
    name: Literal["mc_elbo"] = "mc_elbo"
    mc_num: int = Field(128, ge=1)  # LLaDA's evaluation value; lower it for training
    stratified: bool = True  # masked-token counts l (or times t) stratified across the MC batch
    # "count": l ~ U{1..L} tokens masked, weight L/l (LLaDA's eval); "time": t ~ U(0,1], Bernoulli(t) masks, 1/t
    # (the ELBO as LLaDA 1.5 writes it: VRPO's recipes). Both unbiased for the same ELBO (rl/masking.py mc_elbo).
    form: Literal["count", "time"] = "count"

    def params(self) -> dict[str, Any]:
        return {"num_samples": self.mc_num, "stratified": self.stratified, "form": self.form}


class SDMCEstimator(_EstimatorSection):
    name: Literal["sdmc"] = "sdmc"
    quadrature: Literal["gauss-1", "gauss-2", "gauss-3", "gauss-4", "gauss-5", "simpson"] = "gauss-3"  # GDPO
    # "time": GDPO's 1/t per node (published; biased at short lengths by int(tL) rounding, see BENCHMARKS.md);
    # "count": L/m for the m tokens actually masked.
    weighting: Literal["time", "count"] = "time"

    def params(self) -> dict[str, Any]:
        rule = {"rule": "simpson", "nodes": 3} if self.quadrature == "simpson" else {
            "rule": "gauss", "nodes": int(self.quadrature.split("-")[1])}
        return {**rule, "weighting": self.weighting}


class CoupledEstimator(_EstimatorSection):
    name: Literal["coupled"] = "coupled"
    t_min: Fraction = 0.2  # t ~ U(t_min, t_max) (DiffuCoder)
    t_max: Fraction = 0.8
    full_mask_view: bool = True  # the fully masked third view


class BlockElboEstimator(_EstimatorSection):
    name: Literal["block_elbo"] = "block_elbo"
    mc_num: int = Field(1, ge=1)  # noisy copies per sample (each one pass over every block)
    share_t: bool = False  # one noise level for all blocks of a copy (EBPO's timesteps) instead of one per block

    def params(self) -> dict[str, Any]:
        return {"num_samples": self.mc_num, **({"share_t": True} if self.share_t else {})}


class ESPOEstimator(_EstimatorSection):
    """ESPO's ELBO: x ~ U{0..L} masked tokens (weight (L+1)/x) and, coupled, the complement view (rl/estimators/espo.py)."""

    name: Literal["espo"] = "espo"
    mc_num: int = Field(2, ge=1)  # ESPO's num_mc (run_gsm8k_llada.sh: 2)
    coupled: bool = True  # ESPO's reduce_var (published true)

    def params(self) -> dict[str, Any]:
        return {"num_samples": self.mc_num, "coupled": self.coupled}


class BlockRandomEstimator(_EstimatorSection):
    """SPG's block-wise random masking (forward_type block_random) over the rollout's blocks."""

    name: Literal["block_random"] = "block_random"
    mc_num: int = Field(2, ge=1)  # SPG's num_t: masked forwards per sample
    p_mask: float = Field(0.15, ge=0, lt=1)  # prompt-token masking probability (SPG's p_mask_prompt)
    # "released": SPG's code (block among the blocks holding the completion, every masked token through the first
    # EOS counted, per-forward mean); "block": only the chosen block's masked tokens, weighted to be unbiased for
    # the semi-autoregressive ELBO (rl/masking.py block_random).
    weighting: Literal["released", "block"] = "released"

    def params(self) -> dict[str, Any]:
        return {"num_samples": self.mc_num, "p_mask": self.p_mask, "weighting": self.weighting}


class TrajectoryEstimator(_EstimatorSection):
    name: Literal["trajectory"] = "trajectory"
    shrink: int | None = Field(None, ge=1)  # merge s consecutive steps; None -> 1 (block models), 8 (full attention)
    # Training blocks: "model" = the model's own alignment, the one the rollout decoded with (every rollout log-prob
    # is recomputed exactly); "response" = TraceRL's released training code (blocks from the response start, a
    # train/inference mismatch for SDAR/TraDo); "absolute" = from the sequence start.
    block_alignment: Literal["model", "absolute", "response"] = "model"
    # Block models: score every decoding-step group in one forward whose noisy canvases share one clean part
    # (the same log-probs and gradient as one forward per group); false: one forward per group.
    shared_clean: bool = True


class CanvasTraceEstimator(_EstimatorSection):
    """DiffusionGemma: replay of the recorded canvases (rl/estimators/canvas_trace.py)."""

    name: Literal["canvas_trace"] = "canvas_trace"
    self_conditioning_grad: bool = False  # False: stop-gradient through the self-conditioning logits


class RandomMaskEstimator(_EstimatorSection):
    name: Literal["random_mask"] = "random_mask"
    t_min: Fraction = 0.1  # mask ratio ~ U[0.1, 0.9] (dLLM-RL)
    t_max: Fraction = 0.9
    mc_num: int = Field(1, ge=1)  # masks per sample

    def params(self) -> dict[str, Any]:
        return {"t_min": self.t_min, "t_max": self.t_max, "num_samples": self.mc_num}


class RemaskedStepEstimator(_EstimatorSection):
    """dTRPO: one drawn decoding step per block, its re-masked final state scored in one forward
    (rl/estimators/remasked.py)."""

    name: Literal["remasked_step"] = "remasked_step"
    block_alignment: Literal["model", "absolute", "response"] = "model"


class ArExactEstimator(_EstimatorSection):
    """Exact left-to-right log-probs of AR-order rollouts (JustGRPO; rl/estimators/ar.py)."""

    name: Literal["ar_exact"] = "ar_exact"
    check_order: bool = True  # refuse a sample whose step map is not left to right


class SampledStepsEstimator(_EstimatorSection):
    """AGRPO's timestep estimator: mc_num denoising steps of the recorded trajectory drawn per sample, importance
    weighted so the estimate of the per-step objective is unbiased (rl/estimators/sampled_steps.py)."""

    name: Literal["sampled_steps"] = "sampled_steps"
    mc_num: int = Field(24, ge=1)  # AGRPO train.yaml mc_samples
    low_discrepancy: bool = True  # stratified uniforms (per sample; AGRPO stratifies over the batch)
    objective: Literal["mean", "sum"] = "mean"  # mean over steps (AGRPO) or their sum
    # q(t): uniform (agrpo_config's default) or in proportion to the rollout's summed token entropies per step
    # (AGRPO's train.yaml; the rollout then records them)
    proposal: Literal["uniform", "entropy"] = "uniform"

    def params(self) -> dict[str, Any]:
        return {"num_samples": self.mc_num, "low_discrepancy": self.low_discrepancy, "objective": self.objective,
                "proposal": self.proposal}


class IntermediateStateEstimator(_EstimatorSection):
    """MDPO: log-probs of each trained step's prediction given the recorded state before the step."""

    name: Literal["intermediate_state"] = "intermediate_state"


EstimatorSection = Annotated[
    OneStepEstimator | MCElboEstimator | SDMCEstimator | CoupledEstimator | BlockElboEstimator
    | BlockRandomEstimator | TrajectoryEstimator | RandomMaskEstimator | ESPOEstimator | RemaskedStepEstimator
    | CanvasTraceEstimator | ArExactEstimator | SampledStepsEstimator | IntermediateStateEstimator,
    Field(discriminator="name"),
]
