"""How recipe sections relate: defaults that depend on other sections, and impossible combinations.

derived_defaults() fills the fields a recipe left at None from the algorithm's published values and from the other
sections. A check takes a Recipe whose sections are typed and whose derived defaults are filled, and returns None
or one line "key.path: what is wrong" naming the key to change. Recipe validation (launch/recipe.py) runs them
all and reports the first. Kind-dependent checks run only when the model kind is known (tiny models, an explicit
`model.kind`, or after resolve_kind()).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rl.published import ALGORITHM_DEFAULTS, GENERIC, needs_reference_model  # light: plain data
from rollout.devices import check_request, default_dtype, uses_accelerator  # light: standard library at import
from rollout.models.spec import default_spec_fields  # light: dataclasses only; the model layer's block defaults

if TYPE_CHECKING:
    from launch.recipe import Recipe

BLOCK_CAUSAL_KINDS = frozenset({"block", "sdar", "llada2"})  # TraDo/SDAR, Qwen converted to block diffusion
FULL_ATTENTION_KINDS = frozenset({"llada", "dream"})
TINY_KINDS = {"qwen3-block": "block", "sdar": "sdar", "sdar-moe": "sdar", "llada": "llada", "dream": "dream",
              "llada2": "llada2", "diffusion-gemma": "diffusion_gemma"}

# Estimators each algorithm can train with; the first is its default (filled in when the recipe omits it).
ESTIMATORS_FOR: dict[str, tuple[str, ...]] = {
    "diffu_grpo": ("one_step", "coupled", "random_mask"),
    "gdpo": ("sdmc", "mc_elbo", "block_elbo", "canvas_trace"),
    "cj_grpo": ("trajectory",),
    "tracerl": ("trajectory", "canvas_trace"),
    "coupled_grpo": ("coupled", "one_step", "random_mask"),
    "wd1": ("one_step", "coupled", "random_mask"),
    "spg": ("block_random", "block_elbo", "mc_elbo", "sdmc"),
    "random_mask_grpo": ("random_mask", "one_step", "coupled"),
    "espo": ("espo", "mc_elbo", "sdmc", "block_elbo"),
    "bgpo": ("mc_elbo", "sdmc", "block_elbo"),
    "ebpo": ("block_elbo",),
    "vrpo": ("mc_elbo", "sdmc", "block_elbo"),
    "dtrpo": ("remasked_step", "trajectory"),
    "justgrpo": ("ar_exact",),
    "igpo": ("one_step", "random_mask", "coupled"),  # not the trajectory ones: a hint has no decoding step
    "agrpo": ("sampled_steps",),
    "mdpo": ("intermediate_state",),
    "dtreerpo": ("intermediate_state",),
}
# Why an algorithm is restricted to those estimators: said in the error.
_ESTIMATOR_NEED = {
    "gdpo": "a sequence-level ELBO", "spg": "a sequence-level ELBO", "cj_grpo": "the recorded decoding trajectory",
    "tracerl": "the recorded decoding trajectory", "espo": "a sequence-level ELBO",
    "bgpo": "per-draw Monte Carlo ELBO terms", "ebpo": "block-level ELBOs (a block-diffusion model)",
    "vrpo": "a sequence-level ELBO", "dtrpo": "the recorded decoding trajectory",
    "justgrpo": "exact left-to-right log-probs",
    "agrpo": "steps drawn from the recorded decoding trajectory",
    "mdpo": "the recorded intermediate states", "dtreerpo": "the tree's intermediate states",
}
PREFERENCE_ALGORITHMS = ("vrpo", "dtrpo")  # DPO over pairs: trained offline (launch/driver_offline.py)


def derived_defaults(r: Recipe) -> dict[str, Any]:
    """Values for the fields left at None whose default depends on other sections (only those, nothing else)."""
    fills: dict[str, dict[str, Any]] = {"model": {}, "rollout": {}, "learner": {}, "estimator": {}}
    top: dict[str, Any] = {}
    if r.output_dir is None:
        top["output_dir"] = f"runs/{r.name}"
    if r.model.tiny is not None and r.model.tiny_vocab is None:
        fills["model"]["tiny_vocab"] = "small"
    if r.model.tiny is not None and r.model.kind == "auto":
        fills["model"]["kind"] = TINY_KINDS[r.model.tiny]
    on_accelerator = uses_accelerator(r.resources.device, r.resources.gpus_per_worker)
    if r.model.dtype is None:  # bf16 weights on GPUs (the torch learner keeps fp32 masters), fp32 on CPU as ever
        fills["model"]["dtype"] = default_dtype(on_accelerator)
    if r.rollout.cache is None:  # the exact cache on GPUs; CPU recipes keep the uncached default
        fills["rollout"]["cache"] = "auto" if on_accelerator else "none"
    published = ALGORITHM_DEFAULTS[r.algorithm.name]
    for section in ("learner", "rollout"):
        current = getattr(r, section)
        for key, generic in GENERIC[section].items():
            if getattr(current, key) is None:
                fills[section][key] = getattr(published, section).get(key, generic)
    kind = r.model.declared_kind
    block = _default_decode_block(r, kind)
    if r.rollout.block_size is None and block is not None:
        fills["rollout"]["block_size"] = block
    if r.rollout.threshold is None and r.rollout.remasking == "low_confidence_dynamic":
        fills["rollout"]["threshold"] = 0.9  # TraDo's dynamic decoding threshold
    if r.rollout.threshold is None and r.rollout.remasking == "threshold_schedule":
        fills["rollout"]["threshold"] = 0.95  # LLaDA2's generate default
    eoser = r.rollout.eoser
    if eoser is not None and (eoser.schedule is None or eoser.gamma_min is None):
        schedule = eoser.schedule or ("ass" if r.rollout.ass else "linear")
        gamma_min = eoser.gamma_min if eoser.gamma_min is not None else (0.01 if schedule == "ass" else 0.4)
        fills["rollout"]["eoser"] = {"schedule": schedule, "gamma_min": gamma_min}  # CJ-GRPO's published g_min
    if getattr(r.estimator, "shrink", 0) is None and kind is not None:
        fills["estimator"]["shrink"] = 1 if kind in BLOCK_CAUSAL_KINDS else 8  # TraceRL: block models / LLaDA
    if r.learner.reference_model is None:
        fills["learner"]["reference_model"] = _needs_reference(r)
    if r.learner.zero_stage is None and r.learner.backend == "deepspeed":
        fills["learner"]["zero_stage"] = 2
    top.update({k: v for k, v in fills.items() if v})
    return top


def _default_decode_block(r: Recipe, kind: str | None) -> int | None:
    """The decoding block when the recipe gives none: the model's (block-causal: its training block; full
    attention: its semi-autoregressive block, at most the response), or the whole response under ASS."""
    if r.rollout.ass:
        return r.rollout.max_tokens
    if kind is None:
        return r.model.block_size
    block = r.model.block_size or default_spec_fields(kind)["block_size"]
    return block if kind in BLOCK_CAUSAL_KINDS else min(block, r.rollout.max_tokens)


Check = Callable[["Recipe"], "str | None"]


# ------------------------------------------------------------------------------------------------------ model
def _model_source(r: Recipe) -> str | None:
    if (r.model.path is None) == (r.model.tiny is None):
        return ("model.path: set exactly one of model.path (a checkpoint directory) and model.tiny (a model.path set "
                "in a child recipe or on the command line replaces an inherited model.tiny)")
    if r.model.tiny is None and r.model.tiny_vocab is not None:
        return "model.tiny_vocab: only for tiny models (model.tiny)"
    return None


def _tiny_kind(r: Recipe) -> str | None:
    if r.model.tiny and r.model.kind not in ("auto", TINY_KINDS[r.model.tiny]):
        return f"model.kind: {r.model.kind!r} contradicts model.tiny {r.model.tiny!r} ({TINY_KINDS[r.model.tiny]!r})"
    return None


def _attention(r: Recipe) -> str | None:
    if r.model.attn_implementation == "flash_attention_2":
        return ("model.attn_implementation: flash_attention_2 takes padding masks only, and diffrl's block-diffusion "
                "attention needs its additive 4D masks; use sdpa, eager or flex_attention")
    return None


def _model_alignment(r: Recipe) -> str | None:
    if r.model.block_alignment == "absolute" and r.model.declared_kind in ("llada", "dream"):
        return ("model.block_alignment: 'absolute' applies to block-causal models only (LLaDA/Dream decode "
                "semi-autoregressive blocks from the response start)")
    return None


def _model_block(r: Recipe) -> str | None:
    kind, block = r.model.declared_kind, r.model.block_size
    if block is not None and kind in BLOCK_CAUSAL_KINDS and r.rollout.block_size != block:
        return (f"rollout.block_size: {r.rollout.block_size} != model.block_size {block} "
                "(a block-causal model decodes with the block it was trained with)")
    return None


# ---------------------------------------------------------------------------------------------------- rollout
def _max_tokens_blocks(r: Recipe) -> str | None:
    block = r.rollout.block_size
    if block is not None and r.rollout.max_tokens % block:
        return f"rollout.max_tokens: {r.rollout.max_tokens} is not a multiple of rollout.block_size {block}"
    return None


def _steps(r: Recipe) -> str | None:
    ro, block = r.rollout, r.rollout.block_size
    if ro.steps is not None and ro.steps_per_block is not None:
        return "rollout.steps: set either rollout.steps (total) or rollout.steps_per_block, not both"
    if ro.ass and (ro.steps is not None or ro.steps_per_block is not None):
        return "rollout.ass: the ASS schedule fixes the steps (log2 max_tokens); remove rollout.steps/steps_per_block"
    if ro.steps_per_block is not None and block is not None and ro.steps_per_block > block:
        return f"rollout.steps_per_block: {ro.steps_per_block} > block size {block} (a step unmasks >= 1 token)"
    if ro.steps is not None and ro.steps > ro.max_tokens:
        return f"rollout.steps: {ro.steps} > rollout.max_tokens {ro.max_tokens} (a step unmasks >= 1 token)"
    if ro.steps is not None and block is not None and ro.steps % (ro.max_tokens // block):
        return f"rollout.steps: {ro.steps} is not divisible by the number of blocks {ro.max_tokens // block}"
    if block is not None and ro.min_tokens_per_step > block:
        return f"rollout.min_tokens_per_step: {ro.min_tokens_per_step} > block size {block}"
    return None


def _threshold(r: Recipe) -> str | None:
    ro = r.rollout
    if ro.remasking in ("low_confidence_dynamic", "threshold_schedule") and not 0 < ro.threshold <= 1:
        return f"rollout.threshold: {ro.threshold} outside (0, 1] (a confidence, for {ro.remasking})"
    if ro.remasking == "entropy_bounded" and (ro.threshold is None or ro.threshold <= 0):
        return "rollout.threshold: entropy_bounded remasking needs a positive entropy bound"
    if ro.threshold is not None and ro.remasking not in ("low_confidence_dynamic", "entropy_bounded",
                                                         "threshold_schedule"):
        return (f"rollout.threshold: unused by {ro.remasking!r} remasking (low_confidence_dynamic, entropy_bounded, "
                "threshold_schedule)")
    return None


def _full_attention_decoding(r: Recipe) -> str | None:
    kind, ro = r.model.declared_kind, r.rollout
    if kind in BLOCK_CAUSAL_KINDS and ro.eoser is not None:
        return f"rollout.eoser: EOS early rejection needs a full-attention model, not a block-causal {kind!r} one"
    if kind in BLOCK_CAUSAL_KINDS and ro.ass:
        return f"rollout.ass: the ASS schedule needs a full-attention model, not a block-causal {kind!r} one"
    if ro.ass and ro.block_size not in (None, ro.max_tokens):
        return (f"rollout.block_size: {ro.block_size}, but ASS decodes the whole response as one block "
                f"(set it to rollout.max_tokens {ro.max_tokens})")
    if ro.eoser is not None and ro.remasking in ("topk_margin", "entropy", "origin"):
        return f"rollout.eoser: EOSER rescales confidence, which {ro.remasking!r} remasking does not rank by"
    if ro.eoser is not None and ro.eoser.schedule == "ass" and not ro.ass:
        return "rollout.eoser.schedule: 'ass' follows the ASS step schedule; set rollout.ass: true or use 'linear'"
    if kind in FULL_ATTENTION_KINDS and ro.cache == "block":
        return f"rollout.cache: the exact 'block' cache needs block-causal attention; a {kind} model uses prefix or dual"
    return None


# -------------------------------------------------------------------------------------- algorithm, estimator
def _group_size(r: Recipe) -> str | None:
    if not hasattr(r.algorithm, "advantage") or getattr(r.algorithm, "value_model", None) is not None:
        return None  # the value model gives advantages without a group
    g = r.rollout.samples_per_prompt
    if g < 2:
        return f"rollout.samples_per_prompt: {g} < 2: {r.algorithm.name}'s group-relative advantage needs a group"
    if r.rollout.temperature == 0 and r.rollout.remasking != "random":
        return "rollout.temperature: 0 makes every sample of a group identical (zero advantage); use > 0"
    return None


def _estimator(r: Recipe) -> str | None:
    allowed = ESTIMATORS_FOR[r.algorithm.name]
    if r.estimator.name not in allowed:
        need = _ESTIMATOR_NEED.get(r.algorithm.name, "token-level log-probs")
        return (f"estimator.name: {r.algorithm.name} needs {need}: one of {', '.join(allowed)}, "
                f"not {r.estimator.name!r}")
    if (r.estimator.name == "canvas_trace") != (r.model.declared_kind == "diffusion_gemma") \
            and r.model.declared_kind is not None:
        return ("estimator.name: DiffusionGemma rollouts are scored by 'canvas_trace' (recorded canvases), and "
                "'canvas_trace' scores DiffusionGemma rollouts only")
    if r.estimator.name == "canvas_trace" and getattr(r.algorithm, "value_model", None) is not None:
        return "algorithm.value_model: not available with the canvas_trace estimator (no per-action hidden states)"
    if r.model.declared_kind == "diffusion_gemma" and r.model.lora is not None:
        return ("model.lora: not available for DiffusionGemma (PEFT would give the tied encoder and decoder layers "
                "separate adapters)")
    if r.model.declared_kind == "llada2" and r.model.lora is not None:
        absent = [m for m in r.model.lora.target_modules if m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if absent:  # PEFT only fails when no name matches: the MLPs would match and attention go unadapted
            return (f"model.lora.target_modules: LLaDA2 has no {', '.join(absent)} (its attention is "
                    "query_key_value and dense); name [query_key_value, dense, gate_proj, up_proj, down_proj]")
    if r.model.declared_kind == "diffusion_gemma" and r.learner.backend == "deepspeed" and r.learner.zero_stage == 3:
        return "learner.zero_stage: 3 pads forwards with diffrl's causal-LM scoring layout; use 2 for DiffusionGemma"
    t_min, t_max = getattr(r.estimator, "t_min", 0.0), getattr(r.estimator, "t_max", 1.0)
    if t_min >= t_max:
        return f"estimator.t_min: {t_min} >= estimator.t_max {t_max}"
    return None


def _ar_order(r: Recipe) -> str | None:
    """The exact AR likelihood scores left-to-right rollouts only (and only they, one token a step)."""
    if r.estimator.name == "ar_exact" and r.rollout.remasking != "left_to_right":
        return (f"rollout.remasking: estimator ar_exact scores AR-order rollouts: use left_to_right, "
                f"not {r.rollout.remasking!r}")
    return None


def _inpaint(r: Recipe) -> str | None:
    ip = getattr(r.algorithm, "inpaint", None)
    if ip is None:
        return None
    if ip.ratio_low > ip.ratio_high:
        return f"algorithm.inpaint.ratio_low: {ip.ratio_low} > algorithm.inpaint.ratio_high {ip.ratio_high}"
    if ip.min_chunk > ip.max_chunk:
        return f"algorithm.inpaint.min_chunk: {ip.min_chunk} > algorithm.inpaint.max_chunk {ip.max_chunk}"
    if r.rollout.engine != "torch":
        return (f"rollout.engine: IGPO pre-fills response positions, which only the torch engine does "
                f"(not {r.rollout.engine!r})")
    return None  # free_tail >= max_tokens is allowed: no hint then (IGPO regenerates the group unhinted)


def _tree(r: Recipe) -> str | None:
    """d-TreeRPO: the prompt's samples are its tree's leaves, branching at fixed denoising steps."""
    a = r.algorithm
    if not hasattr(a, "tree_branch_factor"):
        return None
    leaves = a.num_tree_samples * a.tree_branch_factor ** (a.tree_contraction_factor - 1)
    if r.rollout.samples_per_prompt != leaves:
        return (f"rollout.samples_per_prompt: {r.rollout.samples_per_prompt}, but the tree has {leaves} leaves "
                f"(num_tree_samples x tree_branch_factor^(tree_contraction_factor - 1))")
    if r.rollout.remasking in ("low_confidence_dynamic", "entropy_bounded", "origin"):
        return (f"rollout.remasking: {r.rollout.remasking!r} decides its own step count; d-TreeRPO branches at "
                "fixed steps")
    return None


def _filter(r: Recipe) -> str | None:
    f = getattr(r.algorithm, "filter", None)
    if f is not None and f.accuracy_lo is not None and f.accuracy_hi is not None and f.accuracy_lo > f.accuracy_hi:
        return f"algorithm.filter.accuracy_lo: {f.accuracy_lo} > algorithm.filter.accuracy_hi {f.accuracy_hi}"
    return None


def _length_limit(r: Recipe) -> str | None:
    margin = getattr(r.algorithm, "length_limit_margin", None)
    if margin is not None and margin >= r.rollout.max_tokens:
        return (f"algorithm.length_limit_margin: {margin} >= rollout.max_tokens {r.rollout.max_tokens}: every "
                "response would count as wrong (set it to null for short responses)")
    return None


def _value_model(r: Recipe) -> str | None:
    vm = getattr(r.algorithm, "value_model", None)
    if vm is not None and vm.trunk == "shared" and vm.path is not None:
        return "algorithm.value_model.path: a shared value trunk is the policy itself; use trunk: separate"
    return None


def _needs_reference(r: Recipe) -> bool:
    """rl/published.py's rule on the algorithm's loss parameters (the loss registry's default where the section
    has no such field)."""
    loss = {**ALGORITHM_DEFAULTS[r.algorithm.name].loss, **r.algorithm.loss_params()}
    return needs_reference_model(loss.get("beta", 0.0), loss.get("kl_reference", "ref"))


def _reference_model(r: Recipe) -> str | None:
    beta = getattr(r.algorithm, "beta", 0.0)
    if _needs_reference(r) and not r.learner.reference_model:
        return (f"learner.reference_model: false, but algorithm.beta {beta} > 0 with kl_reference 'ref' needs it "
                "(or set algorithm.kl_reference: old)")
    if r.learner.offload_reference and (r.model.lora is not None or not (r.learner.reference_model
                                                                      or _needs_reference(r))):
        why = "a LoRA run's reference is its base (adapters off)" if r.model.lora else "the run has no reference"
        return f"learner.offload_reference: true, but {why}"
    if r.learner.ref_sync_steps and (r.model.lora is not None or not (r.learner.reference_model
                                                                      or _needs_reference(r))):
        why = ("a LoRA run's reference is its base (adapters off), nothing to re-sync (TRL's sync does nothing there "
               "either)") if r.model.lora else "the run has no reference"
        return f"learner.ref_sync_steps: {r.learner.ref_sync_steps}, but {why}"
    if r.learner.ref_sync_steps and r.learner.zero_stage == 3:
        return "learner.ref_sync_steps: not built for ZeRO-3's partitioned reference"
    return None


# ----------------------------------------------------------------------------------------- learner, workers
def _backend(r: Recipe) -> str | None:
    ln = r.learner
    if ln.backend == "torch" and ln.zero_stage is not None:
        return f"learner.zero_stage: ZeRO stage {ln.zero_stage} needs learner.backend: deepspeed"
    if ln.backend == "torch" and ln.num_workers > 1:
        return f"learner.num_workers: {ln.num_workers} learners need learner.backend: deepspeed (torch is one process)"
    return None


def _offload(r: Recipe) -> str | None:
    if r.learner.offload_optimizer and r.learner.backend != "deepspeed":
        return ("learner.offload_optimizer: optimizer offload is DeepSpeed's ZeRO-Offload; "
                "set learner.backend: deepspeed")
    return None


def _device(r: Recipe) -> str | None:
    res = r.resources
    problem = check_request(res.device, res.gpus_per_worker)
    if problem is None and res.device == "cpu" and res.gpus_per_worker > 0:
        problem = (f"resources.device: 'cpu', but resources.gpus_per_worker {res.gpus_per_worker:g} reserves GPUs no "
                   "actor would use; set resources.gpus_per_worker: 0")
    return problem


RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def _node_labels(r: Recipe) -> str | None:
    res = r.resources
    for role in ("rollout", "learner"):
        label = getattr(res, f"{role}_node")
        if label is None:
            continue
        if label in RAY_BUILTIN_RESOURCES:
            return (f"resources.{role}_node: {label!r} is one of Ray's own resources; name a custom resource the "
                    f"{role} nodes advertise (ray start --resources='{{\"{role}_node\": 1}}')")
        if res.placement != "split":
            return (f"resources.{role}_node: only for placement 'split' (colocated runs put both roles in the same "
                    "bundles, on one node)")
    return None


def _prompts_split(r: Recipe) -> str | None:
    n, workers = r.data.num_prompts_per_step, r.rollout.num_workers
    if n % workers:
        return f"data.num_prompts_per_step: {n} is not divisible by {workers} rollout workers"
    return None


# ------------------------------------------------------------------------------------------ data, trainer, ray
def _data_source(r: Recipe) -> str | None:
    offline = _offline_data(r)
    if offline is not None or r.trainer.mode == "offline":
        return offline
    if (r.data.train is None) == (r.data.task is None):
        return "data.train: set exactly one of data.train (a file) and data.task (a generated toy task)"
    if r.data.task_kwargs and r.data.task is None:
        return "data.task_kwargs: only for a generated toy task (data.task)"
    return None


def _offline_data(r: Recipe) -> str | None:
    """Preference algorithms train offline from pairs (data.preferences: VRPO's jsonl; data.trajectories: a run's
    store for dTRPO), and only they do; an offline run reads no prompt source."""
    d, preference = r.data, r.algorithm.name in PREFERENCE_ALGORITHMS
    if r.trainer.mode != "offline":
        if preference:
            return f"trainer.mode: {r.algorithm.name} trains from stored pairs, set trainer.mode: offline"
        if d.preferences is not None or d.trajectories is not None:
            return "data.preferences / data.trajectories: only read by trainer.mode: offline"
        return None
    if not preference:
        return (f"trainer.mode: offline trains a preference algorithm ({', '.join(PREFERENCE_ALGORITHMS)}), "
                f"not {r.algorithm.name}")
    if d.train is not None or d.task is not None:
        return "data.task: not read in trainer.mode offline (pairs come from data.preferences or data.trajectories); set it to null"
    if r.algorithm.name == "dtrpo" and d.trajectories is None:
        return "data.trajectories: dtrpo trains from a run's trajectory store (runs/NAME or runs/NAME/store)"
    if r.algorithm.name == "vrpo" and (d.preferences is None) == (d.trajectories is None):
        return "data.preferences: vrpo needs exactly one of data.preferences (jsonl) and data.trajectories"
    if r.algorithm.name == "dtrpo" and d.preferences is not None:
        return "data.preferences: dtrpo needs recorded trajectories (data.trajectories), not text pairs"
    if r.trainer.eval_every:
        return "trainer.eval_every: no evaluation in trainer.mode offline (no rollout workers); set it to 0"
    return None


def _trainer(r: Recipe) -> str | None:
    t = r.trainer
    if t.off_policy == "behaviour" and r.estimator.name not in ("trajectory", "canvas_trace"):
        return (f"trainer.off_policy: 'behaviour' needs estimator 'trajectory' (the rollout records trajectory "
                f"log-probs), not {r.estimator.name!r}")
    if t.mode == "async" and t.max_staleness < 1:
        return f"trainer.max_staleness: {t.max_staleness} < 1 in async mode (use trainer.mode: sync for on-policy)"
    if t.eval_every and r.data.eval is None and r.data.task is None:
        return "trainer.eval_every: no evaluation data (set data.eval)"
    if t.budget is not None and t.budget.clock == "cpu" and r.ray.address is not None:
        return ("trainer.budget.clock: cpu counts this machine's process tree, but ray.address joins a cluster "
                "whose actors run elsewhere; use clock: wall")
    return None


def _behaviour_temperature(r: Recipe) -> str | None:
    temperature = r.rollout.temperature or 1.0
    if r.trainer.off_policy == "behaviour" and temperature != 1.0 and r.algorithm.logp_temperature == "raw":
        return (f"algorithm.logp_temperature: 'raw', but trainer.off_policy 'behaviour' reuses log-probs recorded at "
                f"rollout.temperature {temperature}; set it to 'rollout'")
    return None


def _ray(r: Recipe) -> str | None:
    if r.ray.address is not None:
        for key in ("num_cpus", "object_store_mb"):
            if getattr(r.ray, key) is not None:
                return f"ray.{key}: only for a local cluster, but ray.address is set"
    return None


CHECKS: tuple[Check, ...] = (
    _model_source, _tiny_kind, _attention, _model_alignment, _model_block, _max_tokens_blocks, _steps, _threshold,
    _full_attention_decoding, _group_size, _estimator, _ar_order, _inpaint, _tree, _filter, _length_limit,
    _value_model, _reference_model,
    _backend, _offload, _device, _node_labels, _prompts_split, _data_source, _trainer, _behaviour_temperature, _ray,
)


def problems(recipe: Recipe) -> list[str]:
    """Every failed check's message, in the order of CHECKS."""
    return [msg for check in CHECKS if (msg := check(recipe)) is not None]
