"""Everything the driver does once before step 1: the run directory, the initial policy, data, reward checks,
and where each actor runs. Kept apart so that launch/driver.py reads as the RL step and nothing else.

    ctx = prepare_run(recipe, resume=ckpt_or_None)   # fails early, one line per problem, nothing overwritten
    plan = placement_plan(ctx.recipe)                 # bundles and which role sits in which bundle

Run directory (recipe.output_dir, default runs/NAME):
    recipe.yaml        the validated recipe with its paths made absolute (what `diffrl resume` reads)
    .lock              the run's claim on the directory (an flock held while it runs; launch/preflight.py)
    run.json           state (running / finished / failed), step, pid, times, last error (one line)
    model_init/        the tiny random model built offline (model.tiny), seeded by the recipe
    metrics.jsonl  tensorboard/  curves.png
    store/             scored trajectories, one Parquet file per step
    checkpoints/       step_N/ ... and `latest`
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.data import Prompt, load_prompts, reward_item
from launch.preflight import RunDirClaim, check_run_inputs, claim_run_dir
from launch.recipe import Recipe, check_paths, recipe_from_dict, resolve_kind, save_recipe
from rl.atomic_io import atomic_output, atomic_write
from rollout.errors import OneLineError, one_line

log = logging.getLogger(__name__)

__all__ = ["SetupError", "RunContext", "prepare_run", "placement_plan", "PlacementPlan", "write_run_status",
           "absolute_recipe"]


class SetupError(OneLineError):
    """A run that cannot start (its directory, model or reward); one line naming the field or file."""


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    start_policy_dir: Path  # the weights the learner starts from: the initial policy, or the resumed checkpoint's
    tokenizer: Any
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    initial_policy_dir: Path  # the run's version-0 policy, also after a resume: KL reference, LoRA base, rollout start
    recipe_dir: Path | None = None  # folder of the recipe file (file-path rewards resolve against it)
    reward_specs: list[dict] = field(default_factory=list)  # plain specs every RewardService actor resolves
    claim: RunDirClaim | None = None  # the exclusive hold on run_dir: released when the run ends

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def store_dir(self) -> Path:
        return self.run_dir / "store"


# ------------------------------------------------------------------------------------------------ recipe paths
def _absolute(value: str | None, bases: list[Path]) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    for base in bases:
        if (base / path).exists():
            return str((base / path).resolve())
    return str((bases[0] / path).resolve())


def absolute_recipe(recipe: Recipe, recipe_dir: Path | None = None) -> Recipe:
    """The recipe with every local path absolute (model, data, value model, reward files, output_dir), so the saved
    copy means the same thing from any directory. A recipe read from a file has its input paths absolute already
    (load_recipe: relative to the file's folder, overrides to the working directory); what is still relative here
    (output_dir, a recipe built from a mapping) is taken from the working directory, reward files also from
    `recipe_dir`."""
    cwd = Path.cwd()
    data = recipe.to_dict()
    data["model"]["path"] = _absolute(data["model"]["path"], [cwd])
    data["data"]["train"] = _absolute(data["data"]["train"], [cwd])
    data["data"]["eval"] = _absolute(data["data"]["eval"], [cwd])
    data["output_dir"] = _absolute(data["output_dir"], [cwd])
    value_model = data["algorithm"].get("value_model")
    if value_model and value_model.get("path"):
        value_model["path"] = _absolute(value_model["path"], [cwd])
    for spec in data["reward"]:
        where, sep, func = spec["fn"].rpartition(":")
        if sep and where.endswith(".py"):
            spec["fn"] = f"{_absolute(where, [cwd] + ([recipe_dir] if recipe_dir else []))}:{func}"
    return recipe_from_dict(data, source=f"recipe {recipe.name!r}")


# --------------------------------------------------------------------------------------------------- run.json
def write_run_status(run_dir: Path, **fields: Any) -> None:
    """Merge fields into run.json (atomic replace)."""
    path = run_dir / "run.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(fields, updated=time.time())
    atomic_write(path, json.dumps(current, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ preparation
def _initial_model(recipe: Recipe, run_dir: Path, claim: RunDirClaim) -> Path:
    if recipe.model.tiny is None:
        return Path(recipe.model.path)
    from rollout.models.tiny import make_tiny_policy

    target = run_dir / "model_init"
    if not (target / "config.json").is_file():
        if not target.exists():
            claim.created.append(target)  # removed again if preparation fails later
        with atomic_output(target) as tmp:
            make_tiny_policy(recipe.model.tiny, tmp, vocab=recipe.model.tiny_vocab or "small", seed=recipe.seed,
                             block_size=recipe.model.block_size, block_alignment=recipe.model.block_alignment)
    return target


def _resolved_kind(recipe: Recipe, model_dir: Path) -> Recipe:
    """Fill model.kind (and the block size) from the checkpoint's config when the recipe says `auto`."""
    from rollout.models.loading import SIDECAR, detect_kind, read_json
    from rollout.models.spec import ModelLoadError, default_spec_fields

    try:
        config = read_json(model_dir / "config.json", "config.json")
        sidecar = read_json(model_dir / SIDECAR, SIDECAR) if (model_dir / SIDECAR).exists() else {}
        kind = detect_kind(config, sidecar, recipe.model.kind, model_dir)
    except ModelLoadError as err:
        raise SetupError(f"model.path: {err}") from None
    block = sidecar.get("block_size", config.get("block_size", default_spec_fields(kind)["block_size"]))
    return resolve_kind(recipe, kind, int(block) if block else None)


def _check_run_dir(run_dir: Path, resuming: bool) -> None:
    if resuming:
        return
    taken = [name for name in ("checkpoints", "store", "metrics.jsonl") if (run_dir / name).exists()]
    if taken:
        raise SetupError(f"output_dir: {run_dir} already holds a run ({taken[0]}); continue it with "
                         f"`diffrl resume {run_dir}` or pick another name/output_dir")


def prepare_run(recipe: Recipe, *, resume=None, recipe_dir: Path | None = None) -> RunContext:
    """Validate everything that can be checked before Ray starts; claim the run directory; build the tiny model;
    load the data. A failure leaves nothing behind: the inputs are checked before anything is written, and what
    the claim created (the run directory itself, or model_init/ in an existing one) is removed again."""
    recipe = absolute_recipe(recipe, recipe_dir)
    check_paths(recipe)
    check_run_inputs(recipe, resume)
    run_dir = Path(recipe.output_dir)
    claim = claim_run_dir(run_dir)
    try:
        _check_run_dir(run_dir, resume is not None)
        initial_dir = _initial_model(recipe, run_dir, claim)
        recipe = _resolved_kind(recipe, initial_dir)
        start_dir = resume.policy_dir if resume is not None else initial_dir
        tokenizer = _tokenizer(start_dir)
        prompts = load_prompts(recipe.data, tokenizer, split="train", seed=recipe.seed)
        if recipe.algorithm.name == "igpo":  # its reference traces, checked before anything starts
            from launch.igpo import check_reference_traces

            check_reference_traces(prompts, recipe.algorithm.inpaint.reference_field)
        eval_prompts: list[Prompt] = []
        if recipe.trainer.eval_every:
            eval_prompts = load_prompts(recipe.data, tokenizer, split="eval", seed=recipe.seed)
            eval_prompts = _held_out(recipe, prompts, eval_prompts, initial_dir)
        specs = _check_rewards(recipe, prompts[0], recipe_dir)
        if resume is None:
            save_recipe(recipe, run_dir / "recipe.yaml")
    except BaseException:
        claim.abandon()
        raise
    return RunContext(recipe, run_dir, start_dir, tokenizer, prompts, eval_prompts, initial_dir, recipe_dir, specs,
                      claim)


def _held_out(recipe: Recipe, prompts: list[Prompt], eval_prompts: list[Prompt], initial_dir: Path) -> list[Prompt]:
    """The evaluation prompts that are neither this run's training prompts nor its starting model's SFT data
    (`sft.json`), as data.eval_overlap says (launch/heldout.py)."""
    from launch.heldout import check_heldout, training_sources

    where = f"data.eval {recipe.data.eval}" if recipe.data.task is None else f"data.task {recipe.data.task!r} test split"
    key = None
    if recipe.data.task is not None:
        from rl.tasks import TASKS

        key = TASKS[recipe.data.task].prompt_key  # one problem however its prompt is spelled
    sources = [("data.train", [p.text for p in prompts], key), *training_sources(None, initial_dir)]
    keep = check_heldout([p.text for p in eval_prompts], sources, overlap=recipe.data.eval_overlap, where=where)
    return [eval_prompts[i] for i in keep]


def _tokenizer(policy_dir: Path):
    from transformers import AutoTokenizer

    from rollout.models.loading import tokenizer_config
    from rollout.models.spec import ModelLoadError

    try:  # tokenizer_config: the parsed config of checkpoints transformers does not know (SDAR, LLaDA2)
        return AutoTokenizer.from_pretrained(str(policy_dir), **tokenizer_config(policy_dir))
    except (OSError, ValueError, ModelLoadError) as err:
        raise SetupError(f"model.path: {policy_dir}: tokenizer failed to load ({type(err).__name__}: "
                         f"{one_line(err, 200)})") from None


def _check_rewards(recipe: Recipe, sample: Prompt, recipe_dir: Path | None) -> list[dict]:
    """Resolve every reward and call it once on a real row (every column, as the driver will pass them, with an
    empty response): a typo or a column the data lacks fails here, not after the first rollout."""
    from rewards.specs import validate_reward_specs

    specs = [{"fn": s.fn, "weight": s.weight, "kwargs": dict(s.kwargs)} for s in recipe.reward]
    row = reward_item(sample, "", 0, prompt_field=recipe.data.prompt_field, answer_field=recipe.data.answer_field)
    validate_reward_specs(specs, row, base_dir=recipe_dir)
    return specs


# ------------------------------------------------------------------------------------------------- placement
NODE_LABEL_SHARE = 0.001  # of a node label each bundle takes: a node advertising 1 unit holds up to 1000 bundles


@dataclass(frozen=True)
class PlacementPlan:
    """One placement group; bundle index per actor. Colocated: rollout worker i and learner i share bundle i
    (each takes half of its CPU/GPU); split: rollout bundles first, then learner bundles.

    strategy: colocated runs are STRICT_PACK (every bundle on one node): the two sides take turns on the same GPUs
    and learner rank 0 hands weights to every rollout worker on that node (CUDA IPC needs one node); a colocated run
    larger than a node fails to place, with one line, instead of silently spreading. Split runs PACK (best effort):
    learner ranks meet at rank 0's node address and weights travel over the network, so any node will do.

    node_labels: role -> the custom resource (resources.rollout_node / learner_node) that marks the nodes the role
    must run on; each of the role's bundles asks for NODE_LABEL_SHARE of it, so only those nodes can hold it."""

    bundles: list[dict[str, float]]
    rollout_bundles: list[int]
    learner_bundles: list[int]
    rollout_resources: dict[str, float]  # num_cpus / num_gpus of one rollout worker
    learner_resources: dict[str, float]
    strategy: str = "PACK"
    node_labels: dict[str, str] = field(default_factory=dict)


def placement_plan(recipe: Recipe) -> PlacementPlan:
    res = recipe.resources
    n_roll, n_learn = recipe.rollout.num_workers, recipe.learner.num_workers
    cpu, gpu = float(res.cpus_per_worker), float(res.gpus_per_worker)
    bundle = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    if res.placement == "colocated":
        n = max(n_roll, n_learn)
        share = {"num_cpus": cpu / 2, "num_gpus": gpu / 2}
        return PlacementPlan([dict(bundle) for _ in range(n)], list(range(n_roll)), list(range(n_learn)),
                             share, share, strategy="STRICT_PACK")
    whole = {"num_cpus": cpu, "num_gpus": gpu}
    labels = {role: label for role, label in (("rollout", res.rollout_node), ("learner", res.learner_node)) if label}

    def labelled(role: str) -> dict[str, float]:
        return {**bundle, **({labels[role]: NODE_LABEL_SHARE} if role in labels else {})}

    return PlacementPlan([labelled("rollout") for _ in range(n_roll)] + [labelled("learner") for _ in range(n_learn)],
                         list(range(n_roll)), list(range(n_roll, n_roll + n_learn)), whole, whole,
                         node_labels=labels)


def missing_node_labels(plan: PlacementPlan, cluster_resources: dict[str, float]) -> str | None:
    """None, or the one-line problem when no node of the cluster advertises a label the plan needs."""
    for role, label in plan.node_labels.items():
        if cluster_resources.get(label, 0) <= 0:
            return (f"resources.{role}_node: no node of the Ray cluster advertises the resource {label!r}; start the "
                    f"{role} nodes with `ray start ... --resources='{{\"{label}\": 1}}'` (the cluster has: "
                    f"{', '.join(sorted(k for k in cluster_resources if not k.startswith('node:'))) or 'nothing'})")
    return None


def create_placement_group(plan: PlacementPlan, timeout_s: float = 120.0):
    """Reserve the bundles (fails with one line when the cluster cannot hold them)."""
    import ray
    from ray.util.placement_group import placement_group

    problem = missing_node_labels(plan, ray.cluster_resources())
    if problem is not None:
        raise SetupError(problem)
    group = placement_group(plan.bundles, strategy=plan.strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        total = {k: sum(b.get(k, 0) for b in plan.bundles) for k in ("CPU", "GPU")}
        where = " on one node (colocated placement)" if plan.strategy == "STRICT_PACK" else ""
        if plan.node_labels:
            where = " on the labelled nodes (" + ", ".join(f"{role}: {label}" for role, label in
                                                            plan.node_labels.items()) + ")"
        raise SetupError(f"resources: the cluster cannot place {len(plan.bundles)} bundles ({total['CPU']:g} CPU, "
                         f"{total['GPU']:g} GPU){where} within {timeout_s:.0f}s; available: "
                         f"{ray.available_resources()}")
    return group


def host() -> str:
    return socket.gethostname()
