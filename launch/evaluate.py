"""Evaluate a checkpoint: generate n samples per problem, score them, report avg@n and unbiased pass@k.

    diffrl eval CKPT --data humaneval --k 4 --decoding dynamic --out evals/x    # 4 samples each, avg@4, pass@4
    run_eval(CKPT, EvalRun(data=["humaneval", "math500.jsonl"], n=4, k=(1, 4), format="math500",
                           rollout={"remasking": "low_confidence_dynamic", "temperature": 1.0}, out="evals/x"))

(The CLI has no --n: `--k K` draws K samples per problem; several ks for one n are the Python API's.)

What it does is one typed record, `EvalRun`, whose decoding is a recipe's rollout section and whose model loading
options are a recipe's model section: `diffrl eval` builds it from the checkpoint's own recipe (`EvalRun.from_recipe`)
and the command line.

Data: a file is read as training reads it (`prompt`/`answer`, or prompt_field/answer_field); a benchmark's own
columns and instruction only with `format` (launch/evaluate_data.py: MATH500, GSM8K, HumanEval, MBPP, ...).
Scoring: reward functions through rewards.scorer.Scorer, as the driver scores rollouts: a recipe's `reward`
section when given (`diffrl eval RUN` passes the run's own for the run's own data), else the built-in reward of
each item's kind (`math`, `code`, the toy task's verifier); a sample is correct when its reason is `correct`.
Decoding: `rollout.remasking` low_confidence_static (`steps_per_block` steps per block; default one token a step),
low_confidence_dynamic (every token above `threshold` per step) or any registered remasking name, mapped to
SamplingParams by launch/decoding.py exactly as training maps them; `model.block_size` overrides the checkpoint's
(block size 1 = autoregressive decoding, the AR baseline).

Sample j of item `id` decodes with seed `sample_seed(seed, id, j, "eval")`: results depend on the seed, never on
the batch size or the order of the data. Prints a summary table (avg@n and pass@k in percent); with `out` set
(`--out`), also writes `<out>/<dataset>.jsonl` (one row per problem: responses, scores, reasons, pass@k) and
`<out>/summary.json` (the same figures as fractions in [0, 1], its `scale` key says so).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, field_validator

from launch.evaluate_data import EvalItem, EvalSet, load_eval_set
from launch.recipe import ModelSection, Recipe, RewardSection, RolloutSection
from launch.recipe_sections import Section
from rewards.result import reason_category
from rl.atomic_io import atomic_write
from rl.passk import avg_at_n, mean_pass_at_k

log = logging.getLogger(__name__)

__all__ = ["EvalRun", "Sample", "builtin_rewards", "eval_prompt_ids", "eval_reward_item", "run_eval", "evaluate",
           "policy_responder", "score_samples", "format_table", "parse_ks"]


@dataclass
class Sample:
    text: str  # decoded response up to (not including) EOS, special tokens removed
    tokens: int = 0  # response tokens up to and including EOS
    decoded: int = 0  # positions the decoder filled (whole blocks)
    nfe: int = 0  # forward passes spent
    finish_reason: str = ""


# A responder turns (eval set, n) into n samples per item: the policy through the engine, or a stub in tests.
Responder = Callable[[EvalSet, int], list[list[Sample]]]


def parse_ks(k: int | str | Sequence[int]) -> tuple[int, ...]:
    """`1,4,8` / 4 / [1, 4] -> sorted unique ks."""
    if isinstance(k, int):
        values = [k]
    elif isinstance(k, str):
        values = [int(part) for part in k.replace(" ", "").split(",") if part]
    else:
        values = [int(v) for v in k]
    if not values or min(values) < 1:
        raise ValueError(f"--k: need positive integers, got {k!r}")
    return tuple(sorted(set(values)))


class EvalRun(Section):
    """Everything `diffrl eval` does. `rollout` is a recipe's rollout section: remasking, steps, threshold,
    temperature, top_k / top_p, EOSER / ASS and batch_size (requests decoded together); its max_tokens and cache are
    superseded here by `max_tokens` (None: each dataset's own budget) and `cache` ("auto": the model's own).
    `model` is a recipe's model section, of which a checkpoint directory is loaded with kind, block_size (a decoding
    block other than the checkpoint's), trust_remote_code and dtype."""

    data: list[str] = Field(min_length=1)  # dataset names (humaneval, math500, a toy task) or data files
    n: int = Field(1, ge=1)  # samples per problem
    k: tuple[int, ...] = (1,)  # pass@k for each k (<= n)
    rollout: RolloutSection = RolloutSection(temperature=0.0, batch_size=32)
    max_tokens: int | None = Field(None, ge=1)
    cache: Literal["auto", "none", "prefix", "dual", "block"] = "auto"
    model: ModelSection = ModelSection()
    limit: int | None = Field(None, ge=1)  # first N rows of each dataset only
    prompt_field: str | None = None  # None: `prompt` (or the named format's own column)
    answer_field: str | None = None
    # How a data file is read: "prompt" as training reads it; a benchmark's name for its own columns and
    # instruction (launch/evaluate_data.py). Never guessed from the columns.
    format: Literal["prompt", "task", "humaneval", "mbpp", "livecodebench", "math500", "gsm8k"] = "prompt"
    chat_template: bool | None = None  # None: the tokenizer's chat template when it has one
    task_kwargs: dict[str, Any] | None = None  # toy tasks: generator parameters (None: an SFT checkpoint's own)
    task_seed: int | None = None
    reward: list[RewardSection] | None = None  # None: each item's built-in reward
    reward_base_dir: str | None = None  # where `file.py:func` rewards are resolved
    workers: int = Field(2, ge=1)  # built-in math / code reward workers
    test_timeout_s: float = Field(5.0, gt=0)
    seed: int = Field(0, ge=0)  # sampling seed only
    device: str = "cpu"
    out: str | None = None  # folder for per-sample rows and summary.json
    print_table: bool = True
    # Items whose prompt the checkpoint was trained on (its run's data, its SFT data; launch/heldout.py): refuse,
    # drop them, or allow them (a warning says the figure is then not a held-out one).
    overlap: Literal["refuse", "drop", "allow"] = "refuse"

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, data: Any) -> Any:
        return [data] if isinstance(data, str) else data

    @field_validator("k", mode="before")
    @classmethod
    def _ks(cls, k: Any) -> tuple[int, ...]:
        return parse_ks(k)

    @classmethod
    def from_recipe(cls, recipe: Recipe | dict, data: str | list[str], **changes: Any) -> EvalRun:
        """Decode as the recipe's rollout section, load as its model section (the checkpoint itself is given to
        run_eval), score with its reward section, seed as it; `changes` replace any field. `recipe` may be a
        validated Recipe or the plain mapping of a saved recipe.yaml (sections it lacks keep their defaults)."""
        sections = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
        fields: dict[str, Any] = {"data": data, "seed": int(sections.get("seed", 0))}
        if sections.get("rollout") is not None:
            rollout = RolloutSection.model_validate(sections["rollout"])
            fields.update(rollout=rollout, max_tokens=rollout.max_tokens)
            if "cache" in rollout.model_fields_set:
                fields["cache"] = rollout.cache
        if sections.get("model") is not None:
            own = {key: value for key, value in sections["model"].items() if key not in _CHECKPOINT_KEYS}
            fields["model"] = ModelSection.model_validate(own)
        if sections.get("reward") is not None:
            fields["reward"] = sections["reward"]
        if (sections.get("data") or {}).get("chat_template") is not None:  # encode prompts as training did
            fields["chat_template"] = bool(sections["data"]["chat_template"])
        return cls.model_validate({**fields, **changes})


# What a recipe's model section says about building a model, not about loading the checkpoint being evaluated.
_CHECKPOINT_KEYS = ("path", "tiny", "tiny_vocab", "lora", "gradient_checkpointing")


# ------------------------------------------------------------------------------------------------ generation
def eval_prompt_ids(tokenizer, item: EvalItem, *, chat_template: bool) -> list[int]:
    """The prompt token ids an item is decoded from: launch.data.encode_prompt, as training and SFT encode a data
    row (a HumanEval item without chat is the bare function prefix the model completes)."""
    from launch.data import encode_prompt

    text = item.prompt if chat_template else item.meta.get("completion_prompt", item.prompt)
    return encode_prompt(tokenizer, text, chat_template=chat_template)


def policy_responder(policy, run: EvalRun, *, progress: bool = True) -> Responder:
    """A responder generating with `policy` through the rollout engine (cached block diffusion for block models),
    decoding as `run.rollout` says, sample j of item `id` seeded by sample_seed(run.seed, id, j, "eval")."""
    from launch.decoding import sampling_params
    from rl.masking import sample_seed
    from rollout.engine import engine_for
    from rollout.sampling import GenerationRequest

    batch_size, seed = run.rollout.batch_size, run.seed
    engine = engine_for(policy, kv_cache=run.cache, max_batch_size=batch_size)
    tokenizer = policy.tokenizer
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if run.chat_template is None else run.chat_template

    def respond(evalset: EvalSet, n: int) -> list[list[Sample]]:
        params = sampling_params(run.rollout, block_size=policy.spec.block_size,
                                 max_tokens=run.max_tokens or evalset.max_tokens)
        out: list[list[Sample]] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(evalset.items), desc=f"eval {evalset.name}", unit="item")
        per_call = max(1, batch_size // n)
        try:
            for start in range(0, len(evalset.items), per_call):
                chunk = evalset.items[start:start + per_call]
                requests = []
                for item in chunk:
                    ids = eval_prompt_ids(tokenizer, item, chat_template=use_chat)
                    requests += [GenerationRequest(ids, params, seed=sample_seed(seed, item.id, j, "eval"),
                                                   request_id=f"{item.id}#{j}") for j in range(n)]
                trajectories = engine.generate(requests)
                for i in range(len(chunk)):
                    out.append([_sample(tokenizer, t) for t in trajectories[i * n:(i + 1) * n]])
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return out

    return respond


def _sample(tokenizer, trajectory) -> Sample:
    ids = trajectory.response_ids[:trajectory.valid_length].tolist()
    return Sample(tokenizer.decode(ids, skip_special_tokens=True), trajectory.valid_length,
                  trajectory.response_length, trajectory.nfe, trajectory.finish_reason)


# ------------------------------------------------------------------------------------------------ scoring
def builtin_rewards(item: EvalItem, *, workers: int = 2, test_timeout_s: float = 5.0,
                    total_timeout_s: float = 30.0) -> list[dict]:
    """The reward specs for an item when no recipe gives them: the built-in reward of its kind, as a recipe names
    it (`math` with its default boxed / `####` answers, `code` with every test required, the toy task's own)."""
    if item.kind == "task":
        return [{"fn": item.task}]
    if item.kind == "math":
        return [{"fn": "math", "kwargs": {"workers": workers}}]
    if item.kind == "code":
        return [{"fn": "code", "kwargs": {"score_mode": "all", "test_timeout_s": test_timeout_s,
                                          "total_timeout_s": total_timeout_s, "workers": workers}}]
    raise ValueError(f"eval: no built-in reward for item kind {item.kind!r}")


def eval_reward_item(item: EvalItem, sample: Sample) -> dict[str, Any]:
    """What a reward sees, as in training (launch.data.reward_item): the prompt, the response, the reference, the
    token count, the source row's other columns by name and the whole row as `row`."""
    from launch.data import RESERVED_ITEM_FIELDS

    columns = {k: v for k, v in item.row.items() if k not in RESERVED_ITEM_FIELDS}
    return {**columns, "prompt": item.prompt, "response": sample.text, "reference": item.reference,
            "response_len": sample.tokens, "row": dict(item.row)}


def score_samples(evalset: EvalSet, samples: list[list[Sample]], *, reward: Sequence[dict] | None = None,
                  reward_base_dir: str | Path | None = None, workers: int = 2, test_timeout_s: float = 5.0,
                  total_timeout_s: float = 30.0) -> list[list[dict]]:
    """Reward results (`{"score", "reason", "metrics", "reasons"}`) for every sample, scored by reward functions
    through rewards.scorer.Scorer exactly as the driver scores rollouts: the recipe's `reward` specs when given
    (custom ones included; validated on the first item, so a broken one fails before scoring), else each item's
    built-in reward (`builtin_rewards`). A sample counts as correct when its reason is `correct`."""
    from rewards.scorer import Scorer

    flat = [(i, j) for i, per_item in enumerate(samples) for j in range(len(per_item))]
    groups: dict[str, list[int]] = {}  # items scored by the same specs go through one Scorer, in one batch
    specs_of: dict[str, list[dict]] = {}
    for pos, (i, _) in enumerate(flat):
        specs = list(reward) if reward is not None else builtin_rewards(
            evalset.items[i], workers=workers, test_timeout_s=test_timeout_s, total_timeout_s=total_timeout_s)
        key = json.dumps(specs, sort_keys=True, default=str)
        specs_of[key] = specs
        groups.setdefault(key, []).append(pos)
    results: list[dict | None] = [None] * len(flat)
    for key, positions in groups.items():
        items = [eval_reward_item(evalset.items[flat[p][0]], samples[flat[p][0]][flat[p][1]]) for p in positions]
        sample_row = items[0] if reward is not None else None
        scorer = Scorer(specs_of[key], base_dir=reward_base_dir, sample_row=sample_row)
        for p, result in zip(positions, scorer.score(items), strict=True):
            results[p] = result
    out: list[list[dict]] = [[] for _ in samples]
    for (i, _), result in zip(flat, results):
        out[i].append(result)
    return out


def _correct(result: dict) -> bool:
    return reason_category(result["reason"]) == "correct"


def evaluate(evalset: EvalSet, responder: Responder, *, n: int = 1,
             k: Sequence[int] = (1,), **score_kwargs: Any) -> tuple[dict, list[dict]]:
    """Generate n samples per item with `responder`, score them; return (summary, per-item rows)."""
    ks = parse_ks(k)
    if max(ks) > n:
        raise ValueError(f"k={max(ks)} > n={n}: pass@k needs at least k samples per problem (the CLI's --k K "
                         "draws K samples and reports pass@K)")
    start = time.perf_counter()
    samples = responder(evalset, n)
    gen_s = time.perf_counter() - start
    if len(samples) != len(evalset.items) or any(len(s) != n for s in samples):
        raise ValueError(f"eval: the responder returned {len(samples)} items for {len(evalset.items)} (n={n} each)")
    scores = score_samples(evalset, samples, **score_kwargs)
    rows, counts, reasons = [], [], {}
    for item, item_samples, item_scores in zip(evalset.items, samples, scores):
        correct = [_correct(r) for r in item_scores]
        counts.append(sum(correct))
        for r in item_scores:
            category = reason_category(r["reason"])
            reasons[category] = reasons.get(category, 0) + 1
        reference = item.reference if item.kind != "code" else None  # code tests are long: see the data file
        rows.append({"id": item.id, "prompt": item.prompt, "reference": reference,
                     "responses": [s.text for s in item_samples], "scores": [r["score"] for r in item_scores],
                     "reasons": [r["reason"] for r in item_scores], "correct": correct, "num_correct": sum(correct),
                     **{f"pass@{kk}": mean_pass_at_k([n], [sum(correct)], kk) for kk in ks},
                     "tokens": [s.tokens for s in item_samples], "nfe": [s.nfe for s in item_samples],
                     "finish_reasons": [s.finish_reason for s in item_samples]})
    all_samples = [s for per_item in samples for s in per_item]
    nfe = sum(s.nfe for s in all_samples)
    decoded = sum(s.decoded for s in all_samples)
    summary = {
        "dataset": evalset.name, "shape": evalset.shape, "items": len(evalset.items), "n": n,
        "scale": "avg@n, pass@k and mean_score are fractions in [0, 1] (the printed table shows percent)",
        f"avg@{n}": avg_at_n([n] * len(counts), counts),
        **{f"pass@{kk}": mean_pass_at_k([n] * len(counts), counts, kk) for kk in ks},
        "mean_score": sum(r["score"] for per in scores for r in per) / max(1, len(all_samples)),
        "mean_tokens": sum(s.tokens for s in all_samples) / max(1, len(all_samples)),
        "tokens_per_forward": decoded / nfe if nfe else None,
        "nfe_per_sample": nfe / max(1, len(all_samples)),
        "gen_wall_s": gen_s, "tokens_per_s": decoded / gen_s if gen_s > 0 else None,
        "generation_errors": sum(s.finish_reason.startswith("error") for s in all_samples),
        "reasons": dict(sorted(reasons.items())),
    }
    return summary, rows


# ------------------------------------------------------------------------------------------------ reporting
def format_table(summaries: Sequence[dict]) -> str:
    if not summaries:
        return ""
    metric_keys = sorted({key for s in summaries for key in s if key.startswith(("avg@", "pass@"))},
                         key=lambda key: (not key.startswith("avg@"), int(key.split("@")[1])))
    header = ["dataset", "items", "n", *(f"{key} %" for key in metric_keys), "tok/fwd", "tokens", "gen s"]
    lines = [header]
    for s in summaries:
        tpf = s.get("tokens_per_forward")
        lines.append([s["dataset"], str(s["items"]), str(s["n"]),
                      *[f"{100 * s[key]:.1f}" if key in s else "-" for key in metric_keys],
                      f"{tpf:.2f}" if tpf else "-", f"{s['mean_tokens']:.1f}", f"{s['gen_wall_s']:.1f}"])
    widths = [max(len(row[c]) for row in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _task_params(checkpoint, data: str, task_kwargs: dict | None, task_seed: int | None) -> tuple[dict, int]:
    """Generator parameters of a built-in toy task: the given ones, else those an SFT checkpoint trained with."""
    if task_kwargs is not None and task_seed is not None:
        return task_kwargs, task_seed
    trained: dict = {}
    if isinstance(checkpoint, (str, Path)) and (Path(checkpoint) / "sft.json").is_file():
        recorded = json.loads((Path(checkpoint) / "sft.json").read_text()).get("data", {})
        if recorded.get("task") == data:
            trained = recorded
            log.info("eval %s: task parameters %s, seed %s from %s/sft.json", data, recorded.get("task_kwargs"),
                     recorded.get("task_seed"), checkpoint)
    kwargs = task_kwargs if task_kwargs is not None else dict(trained.get("task_kwargs") or {})
    return kwargs, task_seed if task_seed is not None else int(trained.get("task_seed", 0))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def load_checkpoint_policy(checkpoint, run: EvalRun):
    """A checkpoint directory loaded as `run.model` says, or an in-memory DiffusionPolicy checked against it."""
    import torch

    from rollout.devices import default_dtype
    from rollout.models.loading import load_policy

    model = run.model
    if isinstance(checkpoint, (str, Path)):
        dtype = model.dtype or default_dtype(on_accelerator=run.device != "cpu")
        return load_policy(checkpoint, kind=None if model.kind == "auto" else model.kind,
                           block_size=model.block_size, dtype=getattr(torch, dtype), device=run.device,
                           attn_implementation=model.attn_implementation,
                           attention_kernel=model.attention_kernel,
                           trust_remote_code=model.trust_remote_code, block_alignment=model.block_alignment)
    if model.block_size is not None and model.block_size != checkpoint.spec.block_size:
        raise ValueError("--block-size: pass a checkpoint directory to decode with another block size")
    return checkpoint


def checkpoint_training_sources(checkpoint) -> list[tuple]:
    """What a checkpoint directory says it was trained on (its run's recipe beside it, sft.json); nothing for an
    in-memory policy."""
    from launch.heldout import training_sources

    if not isinstance(checkpoint, (str, Path)):
        return []
    policy_dir = Path(checkpoint)
    recipe_file = policy_dir.parent / "recipe.yaml"
    recipe = None
    if policy_dir.name == "policy" and recipe_file.is_file():
        import yaml

        recipe = yaml.safe_load(recipe_file.read_text())
    return training_sources(recipe, policy_dir)


def load_eval_sets(checkpoint, run: EvalRun, sources: Sequence[tuple] | None = None) -> list[EvalSet]:
    """Every dataset of `run.data`, read and checked before any generation (bad input fails before minutes of
    decoding), with the items the checkpoint trained on refused / dropped / allowed as `run.overlap` says.
    `sources`: the training prompts to check against (default: what `checkpoint`'s directory records)."""
    from launch.evaluate_data import MATH_SUFFIX
    from launch.heldout import check_heldout

    sources = checkpoint_training_sources(checkpoint) if sources is None else sources
    evalsets = []
    for d in run.data:
        kwargs, t_seed = _task_params(checkpoint, d, run.task_kwargs, run.task_seed)
        evalset = load_eval_set(d, limit=run.limit, prompt_field=run.prompt_field, format=run.format,
                                answer_field=run.answer_field, task_kwargs=kwargs, seed=t_seed)
        if sources:
            texts = [item.prompt.removesuffix(MATH_SUFFIX) for item in evalset.items]
            keep = check_heldout(texts, sources, overlap=run.overlap, where=f"--data {d}")
            evalset.items = [evalset.items[i] for i in keep]
        evalsets.append(evalset)
    return evalsets


def evaluate_sets(policy, evalsets: Sequence[EvalSet], run: EvalRun, *, checkpoint_name: str,
                  progress: bool = True) -> list[tuple[dict, list[dict]]]:
    """(summary, per-item rows) of each eval set, generated with `policy` and scored as `run` says."""
    responder = policy_responder(policy, run, progress=progress)
    reward = [spec.model_dump() for spec in run.reward] if run.reward is not None else None
    out = []
    for evalset in evalsets:
        summary, rows = evaluate(evalset, responder, n=run.n, k=run.k, workers=run.workers,
                                 test_timeout_s=run.test_timeout_s, reward=reward,
                                 reward_base_dir=run.reward_base_dir)
        summary.update(checkpoint=checkpoint_name, decoding=run.rollout.remasking, temperature=run.rollout.temperature,
                       block_size=policy.spec.block_size, seed=run.seed,
                       reward=[spec["fn"] for spec in reward] if reward is not None else "built-in")
        if summary["generation_errors"]:
            first = next(r for row in rows for r in row["finish_reasons"] if r.startswith("error"))
            log.warning("eval %s: %d samples failed to generate (first: %s)", evalset.name,
                        summary["generation_errors"], first)
        out.append((summary, rows))
    return out


def checkpoint_name(checkpoint) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, Path)) else "<in memory>"


def run_eval(checkpoint, run: EvalRun, *, progress: bool = True) -> list[dict]:
    """Evaluate `checkpoint` (a directory, or a loaded DiffusionPolicy) on each of `run.data`; return the summaries.

    run.task_kwargs / task_seed parameterise a built-in toy task's generator, whose test split must be the held-out
    split of the training data: when not given, they are read from the checkpoint's `sft.json` if it trained on
    that task (else the generator's defaults and seed 0). `run.seed` only seeds the sampling. Items the checkpoint
    was trained on are refused unless `run.overlap` says otherwise (launch/heldout.py).
    """
    policy = load_checkpoint_policy(checkpoint, run)
    evalsets = load_eval_sets(checkpoint, run)
    out_dir = Path(run.out) if run.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_sets(policy, evalsets, run, checkpoint_name=checkpoint_name(checkpoint), progress=progress)
    summaries = [summary for summary, _ in results]
    if out_dir:
        for evalset, (_, rows) in zip(evalsets, results, strict=True):
            _write_jsonl(out_dir / f"{evalset.name}.jsonl", rows)
        atomic_write(out_dir / "summary.json", json.dumps(summaries, indent=2) + "\n")
    if run.print_table:
        print(format_table(summaries))
    return summaries
