"""The recipe: one YAML file validated into frozen, typed sections before anything heavy starts.

    recipe = load_recipe("recipes/tiny-tracerl.yaml", ["rollout.block_size=8"])
    recipe.rollout.block_size, recipe.algorithm.name, recipe.estimator.name, recipe.to_yaml()

Every section forbids unknown keys. `algorithm` and `estimator` are unions discriminated by `name`: each algorithm
is its own class carrying only its parameters, with its authors' published defaults (shared/ALGORITHMS.md); those
classes live in launch/recipe_sections.py, the estimators in launch/recipe_estimators.py.
A field left at None that has a published or derived default (learner.lr, rollout.samples_per_prompt,
estimator, output_dir...) is filled in during validation, so a validated Recipe is concrete and `to_dict()`
reloads to an equal Recipe. Those defaults and the checks rejecting impossible combinations live in
launch/recipe_rules.py. Failures raise RecipeError with one line naming the file and key path. Only pydantic, yaml
and the model layer's light spec module are imported: no Ray, torch or transformers.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from launch import recipe_rules
from launch.recipe_estimators import EstimatorSection
from launch.recipe_io import (
    RecipeError,
    absolute_paths,
    apply_override,
    deep_merge,
    format_validation_error,
    normalize_shorthands,
    origin_of,
    read_chain,
    retired_setting,
    switch_model_source,
)
from launch.recipe_rules import (
    BLOCK_CAUSAL_KINDS,
    ESTIMATORS_FOR,
    FULL_ATTENTION_KINDS,
    TINY_KINDS,
)
from launch.recipe_sections import AlgorithmSection, Section
from rl.atomic_io import atomic_write  # light: standard library only

__all__ = [
    "BLOCK_CAUSAL_KINDS", "ESTIMATORS_FOR", "FULL_ATTENTION_KINDS", "TINY_KINDS", "Recipe", "RecipeError", "check_paths", "load_recipe", "recipe_from_dict", "resolve_kind",
    "save_recipe",
]


Beta = Annotated[float, Field(ge=0, lt=1)]


# ------------------------------------------------------------------------------------------------------ model
class LoraSection(Section):
    r: int = Field(128, ge=1)  # d1: r 128 / alpha 64 on all projections
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelSection(Section):
    path: str | None = Field(None, min_length=1)  # a local HF checkpoint directory (checked by check_paths)
    tiny: Literal["qwen3-block", "sdar", "sdar-moe", "llada", "dream", "llada2", "diffusion-gemma"] | None = None  # built offline
    tiny_vocab: Literal["small", "qwen"] | None = None  # tiny models only; None -> "small"
    # auto: from tiny, else from config.json
    kind: Literal["auto", "block", "sdar", "llada", "dream", "llada2", "diffusion_gemma"] = "auto"
    block_size: int | None = Field(None, ge=1)  # block-causal: training block; full attention: semi-AR block
    # Where blocks start (block-causal models; rollout/models/masks.py): None = the checkpoint's (diffrl.json), else
    # the kind's: "absolute" (from the sequence start) for sdar, as SDAR/TraDo were trained and decode; "response"
    # (from the response start) for diffrl's block models. Used by decoding and the training layout alike.
    block_alignment: Literal["absolute", "response"] | None = None
    dtype: Literal["float32", "bfloat16"] | None = None  # None -> bfloat16 on accelerators, float32 on CPU
    # Attention kernel passed to from_pretrained; None: sdpa (a checkpoint with its own code: its own default).
    # diffrl's masks are additive float 4D masks, which sdpa, eager and flex_attention honour; flash_attention_2
    # takes padding masks only (rejected: recipe_rules._attention).
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    # How diffrl's block/document masks are run (rollout/models/attention.py): "auto" = FlexAttention BlockMask on
    # CUDA, the exact chunked kernel elsewhere (both O(T) mask state); "dense" = the (B, 1, T, T) additive mask.
    attention_kernel: Literal["auto", "dense", "chunked", "flex"] = "auto"
    trust_remote_code: bool = False
    lora: LoraSection | None = None
    gradient_checkpointing: bool = False  # HF per-layer (activation) checkpointing in the learner, any backend

    @property
    def declared_kind(self) -> str | None:
        """The model kind known without reading the checkpoint; None until resolve_kind() for `auto` paths."""
        if self.kind != "auto":
            return self.kind
        return TINY_KINDS[self.tiny] if self.tiny else None


# ---------------------------------------------------------------------------------------------------- rollout
class EoserSection(Section):
    """CJ-GRPO's EOS early rejection: scale the confidence of EOS candidates by gamma(step)."""

    gamma_min: float | None = Field(None, ge=0, le=1)  # None -> 0.4 (linear) or 0.01 (ass), as published
    schedule: Literal["linear", "ass"] | None = None  # None -> "ass" when rollout.ass, else "linear"


class RolloutSection(Section):
    block_size: int | None = Field(None, ge=1)  # None: model.block_size, else the kind's (block 4, llada/dream 32)
    steps_per_block: int | None = Field(None, ge=1)  # None (and no steps): one token per step
    steps: int | None = Field(None, ge=1)  # total denoising steps, split evenly over blocks (LLaDA/Dream style)
    # Dream's: topk_margin, entropy, origin; left_to_right: AR order, one token a step (JustGRPO)
    remasking: Literal["sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded",
                       "random", "topk_margin", "entropy", "origin", "threshold_schedule",
                       "left_to_right", "rcr"] = "low_confidence_static"
    # topk_margin, entropy, origin: Dream's; threshold_schedule: LLaDA2's; left_to_right: JustGRPO's AR order;
    # rcr: MDPO's running-confidence remasking
    threshold: float | None = None  # dynamic: confidence in (0, 1] (None -> 0.9); entropy_bounded: entropy bound
    min_tokens_per_step: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)  # None -> the algorithm's published value, else 1.0
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    samples_per_prompt: int | None = Field(None, ge=1)  # G; None -> the algorithm's published value, else 8
    # block: exact KV, block-causal only; prefix/dual: Fast-dLLM; auto: block for block-causal models, none for full
    # attention (both exact). None -> auto on accelerators, none on CPU.
    cache: Literal["auto", "none", "prefix", "dual", "block"] | None = None
    eoser: EoserSection | None = None
    ass: bool = False  # CJ-GRPO's ascending step-size schedule: log2(max_tokens) steps
    # False: decode the whole max_tokens canvas even after an EOS (JustGRPO trains every generated position)
    stop_at_eos: bool = True
    num_workers: int = Field(1, ge=1)  # RolloutWorker actors
    batch_size: int = Field(16, ge=1)  # requests decoded together by one worker (at most)
    engine: Literal["torch", "vllm"] = "torch"  # SGLang: a documented seam, not an engine (README)
    # KV cache memory per worker: a fraction of the memory free at generate time (0.9; on CPU of MemAvailable) or
    # a size ("24GiB"); fewer rows than batch_size then decode at once (rollout/memory_budget.py). None: no limit.
    memory_budget: float | str | None = None

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _memory_budget(cls, value):
        from rollout.memory_budget import parse_memory_budget

        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"{value} is ambiguous: write a fraction (0.9) or a size ('24GiB')")
        parse_memory_budget(value, field="memory_budget")
        return value
    # learner -> rollout weights: auto = collective (torch.distributed group, gloo/NCCL) for the torch engine, the
    # Ray object store for other engines; colocated on GPUs: ipc (CUDA IPC handles) for one worker on learner rank
    # 0's GPU, else object_store (NCCL refuses two ranks on one GPU). launch/driver_roles.weight_sync_transport
    weight_sync: Literal["auto", "collective", "object_store", "ipc"] = "auto"


# ------------------------------------------------------------------------------------------- reward and data
_REGISTERED = re.compile(r"^[A-Za-z_][\w-]*$")
_MODULE_FN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_FILE_FN = re.compile(r"^[^:]+\.py:[A-Za-z_]\w*$")


class RewardSection(Section):
    fn: str  # registered name (`math`), `module.path:func` or `path/to/file.py:func`; resolved by rewards/
    weight: float = Field(1.0, allow_inf_nan=False)
    kwargs: dict[str, Any] = {}

    @field_validator("fn")
    @classmethod
    def _fn_syntax(cls, fn: str) -> str:
        if not (_REGISTERED.match(fn) or _MODULE_FN.match(fn) or _FILE_FN.match(fn)):
            raise ValueError(f"{fn!r} is not a registered name, 'module.path:func' or 'file.py:func'")
        return fn

    @property
    def file(self) -> str | None:
        """The Python file of a `file.py:func` reward, else None."""
        return self.fn.rsplit(":", 1)[0] if _FILE_FN.match(self.fn) else None


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataSection(Section):
    train: str | None = None  # .jsonl / .json / .parquet
    task: Literal["arithmetic", "countdown", "sudoku"] | None = None  # generated toy task instead of a file
    task_kwargs: dict[str, Any] = {}  # passed to the toy task generator
    # The generator's seed (which problems are train and which held out); None: the recipe's seed. Runs compared
    # across RL seeds, or RL after an SFT run, must share it, or one run's training problems are another's
    # held-out ones.
    task_seed: int | None = Field(None, ge=0)
    eval: str | None = None
    # Held-out prompts that are also training prompts (normalised text; launch/heldout.py): refuse the run, drop
    # them from the evaluation (logged), or allow them (logged: the eval figure is then not a held-out one).
    eval_overlap: Literal["refuse", "drop", "allow"] = "refuse"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    chat_template: bool = True
    max_prompt_tokens: int = Field(512, ge=1)
    shuffle: bool = True
    num_prompts_per_step: int = Field(8, ge=1)
    # trainer.mode offline (launch/driver_offline.py): preference pairs from a jsonl file (prompt / chosen /
    # rejected fields) or from a run's trajectory store (runs/NAME or runs/NAME/store), pairs_per_step per step.
    preferences: str | None = None
    trajectories: str | None = None
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    pairs_per_step: int = Field(8, ge=1)

    @field_validator("train", "eval")
    @classmethod
    def _data_file(cls, path: str | None) -> str | None:
        if path is not None and not path.endswith(_DATA_SUFFIXES):
            raise ValueError(f"{path!r} is not a {', '.join(_DATA_SUFFIXES)} file")
        return path


# --------------------------------------------------------------------------------- learner, resources, trainer
class LearnerSection(Section):
    optimizer: Literal["adamw"] = "adamw"
    lr: float | None = Field(None, gt=0)  # None here and below -> the algorithm's published value, else generic
    betas: tuple[Beta, Beta] | None = None
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # decay floor of cosine/linear as a fraction of lr (DiffuCoder: 0.1)
    grad_clip: float | None = Field(None, ge=0)  # 0: no clipping
    micro_batch_size: int = Field(1, ge=1)
    pack_tokens: int | None = Field(None, ge=1)  # micro-batches of this many layout tokens, packed rows (rl.learner)
    pack_row_tokens: int | None = Field(None, ge=1)  # packed row length; None: each forward's longest layout
    grad_accum: int | None = Field(None, ge=1)
    mu: int | None = Field(None, ge=1)  # inner updates per rollout batch
    num_workers: int = Field(1, ge=1)  # Learner actors (data parallel; > 1 needs deepspeed)
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[2, 3] | None = None  # DeepSpeed ZeRO stage; None -> 2 with backend deepspeed (torch: unused)
    bf16: bool = False  # mixed precision in the learner (bf16 weights train through fp32 masters either way)
    offload_optimizer: bool = False  # DeepSpeed ZeRO-Offload: optimizer state and step in host memory
    log_entropy: bool = True  # learner/entropy: mean predictive entropy at the scored tokens (one exp per logit)
    reference_model: bool | None = None  # None -> needed by the algorithm (beta > 0 with kl_reference "ref")
    offload_reference: bool = False  # reference in host memory, on the device only for its passes (rl.reference)
    # Reference re-sync every N optimizer steps, ref <- alpha policy + (1 - alpha) ref (TRL's sync_ref_model /
    # ref_model_sync_steps / ref_model_mixup_alpha, default 0.6); 0: the reference stays the initial policy.
    ref_sync_steps: int = Field(0, ge=0)
    ref_sync_alpha: float = Field(0.6, gt=0, le=1)
    router_aux_loss_coef: float = Field(0.0, ge=0)  # MoE policies: router load-balancing loss weight (0: off)
    # Samples trained before an update's first optimizer step take pi_old's log-probs from their training forward
    # (the same update, one forward per such sample fewer; rl.learner_config); false: a separate pass for all.
    fuse_on_policy_old_logp: bool = True


NODE_LABEL = r"^[A-Za-z_][A-Za-z0-9_.-]*$"  # a custom Ray resource name


class ResourcesSection(Section):
    gpus_per_worker: float = Field(1.0, ge=0)  # 0: CPU
    # Where each actor computes (rollout/devices.py, chosen inside the actor): auto = the GPU Ray assigned it, else
    # the CPU; cuda = a GPU or an error; cpu = the CPU even with GPUs reserved.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    placement: Literal["colocated", "split"] = "split"
    # Split placement on a multi-node cluster (docs/MULTINODE.md): the custom Ray resource that marks the nodes each
    # role runs on (`ray start --resources='{"rollout_node": 1}'`); None: any node with room.
    rollout_node: str | None = Field(None, pattern=NODE_LABEL)
    learner_node: str | None = Field(None, pattern=NODE_LABEL)
    cpus_per_worker: int = Field(1, ge=1)
    reward_workers: int = Field(2, ge=1)  # reward worker processes at most (one CPU each while the cluster has them)


class BudgetSection(Section):
    """Stop at the first step boundary past `minutes` of `clock` (launch/budget.py): cpu = CPU time of the driver's
    process tree (the local Ray cluster and its actors), wall = wall clock. A resume counts what was spent."""

    minutes: float = Field(gt=0, allow_inf_nan=False)
    clock: Literal["cpu", "wall"] = "cpu"


class TrainerSection(Section):
    total_steps: int = Field(100, ge=1)
    budget: BudgetSection | None = None  # None: total_steps alone ends the run; else whichever comes first
    mode: Literal["sync", "async", "offline"] = "sync"  # offline: preference pairs, no rollout (driver_offline)
    max_staleness: int = Field(1, ge=0)  # async: how many policy versions a rollout may lag
    # What the learner takes as pi_old for data from an older policy version: "recompute" (the learner's current
    # weights: stale data treated as on-policy), "behaviour" (the rollout's recorded log-probs: a true importance
    # ratio; trajectory estimator only), or "drop" (train only on data of the current version).
    off_policy: Literal["recompute", "behaviour", "drop"] = "recompute"
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(3, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: never
    # Each evaluation also samples the first probe_items held-out prompts probe_samples times (rollout decoding,
    # fixed seeds): greedy vs sampled accuracy on one fixed set (launch/diagnostics.py). 0: no probe.
    probe_items: int = Field(32, ge=0)
    probe_samples: int = Field(4, ge=1)
    log: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]


class RaySection(Section):
    address: str | None = Field(None, min_length=1)  # None: a local cluster on 127.0.0.1
    num_cpus: int | None = Field(None, ge=1)  # local cluster only
    object_store_mb: int | None = Field(None, ge=64)  # local cluster only; None -> the launcher's cap


# ----------------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = Field(0, ge=0)
    output_dir: str | None = None  # None -> runs/<name>
    model: ModelSection
    rollout: RolloutSection = RolloutSection()
    algorithm: AlgorithmSection
    estimator: EstimatorSection | None = None  # None -> the algorithm's default (ESTIMATORS_FOR[name][0])
    reward: list[RewardSection] = Field(min_length=1)
    data: DataSection
    learner: LearnerSection = LearnerSection()
    resources: ResourcesSection = ResourcesSection()
    trainer: TrainerSection = TrainerSection()
    ray: RaySection = RaySection()

    @model_validator(mode="wrap")
    @classmethod
    def _complete_and_check(cls, data: Any, handler: Any) -> Recipe:
        # Two passes: validate, compute the defaults that depend on other sections from the typed result, validate
        # the completed mapping again; then the cross-section checks see concrete values only.
        if isinstance(data, dict):
            retired = retired_setting(data)
            if retired is not None:
                raise ValueError(retired)
            data = _with_estimator_name(normalize_shorthands(data))
        recipe = handler(data)
        fills = recipe_rules.derived_defaults(recipe)
        if fills:
            recipe = handler(deep_merge(recipe.model_dump(), fills))
        problems = recipe_rules.problems(recipe)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(problems[0] + more)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (JSON types only) that recipe_from_dict() turns back into an equal Recipe."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _with_estimator_name(data: dict) -> dict:
    """Fill the estimator's `name` from the algorithm (the union needs its tag before validating anything)."""
    algorithm = data.get("algorithm")
    name = algorithm.get("name") if isinstance(algorithm, dict) else None
    default = ESTIMATORS_FOR.get(name, (None,))[0] if isinstance(name, str) else None
    estimator = data.get("estimator")
    if default is None or (estimator is not None and not isinstance(estimator, dict)):
        return data
    if estimator is None or "name" not in estimator:
        return {**data, "estimator": {**(estimator or {}), "name": default}}
    return data


# ------------------------------------------------------------------------------------------- loading, saving
def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Validate a mapping; failures raise RecipeError("<source>: key.path: what is wrong")."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        message, _ = format_validation_error(exc, Recipe)
        raise RecipeError(f"{source}: {message}") from None


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file, its `extends` chain (deep-merged, base first) and dotted `key=value` overrides.

    The recipe's name defaults to the file's stem. Errors name the file that sets the offending key. Relative
    paths: a path in a recipe file is relative to that file's folder, a path in an override to the working
    directory (recipe_io.absolute_paths); a layer setting model.path or model.tiny replaces the inherited source.
    """
    chain = read_chain(path)
    merged: dict = {}
    for file, data in chain:
        data = absolute_paths(data, file.resolve().parent)
        merged = deep_merge(switch_model_source(merged, data), data)
    for override in overrides:
        merged = apply_override(switch_model_source(merged, apply_override({}, override)), override)
    if overrides:  # what is still relative came from an override (the files' paths are absolute by now)
        merged = absolute_paths(merged, Path.cwd())
    merged.setdefault("name", Path(path).stem)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as exc:
        message, key_path = format_validation_error(exc, Recipe)
        raise RecipeError(f"{origin_of(key_path, chain)}: {message}") from None


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the validated recipe as YAML, atomically (a resume must never read half a recipe)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, recipe.to_yaml())


def resolve_kind(recipe: Recipe, kind: str, block_size: int | None = None) -> Recipe:
    """The recipe with model.kind (and model.block_size, if unset) taken from the checkpoint, re-validated so that
    kind-dependent defaults are filled and kind-dependent checks run. The launcher calls this after reading
    config.json, e.g. resolve_kind(recipe, spec.kind, spec.block_size) with the loaded DiffusionSpec."""
    if recipe.model.kind not in ("auto", kind):
        raise RecipeError(f"recipe {recipe.name!r}: model.kind: recipe says {recipe.model.kind!r} "
                          f"but the checkpoint is {kind!r}")
    data = recipe.to_dict()
    data["model"]["kind"] = kind
    if block_size is not None and data["model"]["block_size"] is None:
        data["model"]["block_size"] = block_size
    if data == recipe.to_dict():
        return recipe
    return recipe_from_dict(data, source=f"recipe {recipe.name!r}")


def check_paths(recipe: Recipe, base_dir: str | os.PathLike | None = None) -> None:
    """Raise RecipeError naming the first field whose local path does not exist (relative to base_dir, default
    the working directory). Kept out of validation so recipes with placeholder paths validate anywhere."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    wanted: list[tuple[str, str | None, bool]] = [  # (field, path, is a directory)
        ("model.path", recipe.model.path, True),
        ("data.train", recipe.data.train, False),
        ("data.eval", recipe.data.eval, False),
        ("data.preferences", recipe.data.preferences, False),
    ]
    value_model = getattr(recipe.algorithm, "value_model", None)
    if value_model is not None:
        wanted.append(("algorithm.value_model.path", value_model.path, True))
    wanted += [(f"reward.{i}.fn", spec.file, False) for i, spec in enumerate(recipe.reward)]
    missing = []
    for field, value, is_dir in wanted:
        if value is None:
            continue
        full = base / Path(value).expanduser()
        if not (full.is_dir() if is_dir else full.is_file()):
            missing.append(f"{field}: {value}: no such {'directory' if is_dir else 'file'}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RecipeError(f"recipe {recipe.name!r}: {missing[0]}{more}")
