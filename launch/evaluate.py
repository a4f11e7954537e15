"""Evaluate a checkpoint: generate n samples per problem, score them, report avg@n and unbiased pass@k.

    diffrl eval CKPT --data humaneval --data math500.jsonl --n 4 --k 1,4 --decoding dynamic --out evals/x
    run_eval(CKPT, ["humaneval", "math500.jsonl"], n=4, k=(1, 4), decoding="dynamic", out="evals/x")

Data shapes: see launch/evaluate_data.py (MATH500, GSM8K, AIME, HumanEval, MBPP, LiveCodeBench, the toy tasks).
Scoring: reward functions through rewards.scorer.Scorer, as the driver scores rollouts: a recipe's `reward`
section when given (`diffrl eval RUN` passes the run's own for the run's own data), else the built-in reward of
each item's kind (`math`, `code`, the toy task's verifier); a sample is correct when its reason is `correct`. Decoding: "static" (low-confidence remasking, `steps_per_block` steps per block; default one token a
step), "dynamic" (every token above `threshold` per step), or any registered remasking name; `block_size`
overrides the checkpoint's (block size 1 = autoregressive decoding, the AR baseline).

Sample j of item `id` decodes with seed `sample_seed(seed, id, j, "eval")`: results depend on the seed, never on
the batch size or the order of the data. Writes `<out>/<dataset>.jsonl` (one row per problem: responses, scores,
reasons, pass@k) and `<out>/summary.json`, and prints a summary table.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from launch.evaluate_data import EvalItem, EvalSet, load_eval_set
from rl.atomic_io import atomic_write
from rl.passk import avg_at_n, mean_pass_at_k

log = logging.getLogger(__name__)

__all__ = ["Sample", "builtin_rewards", "eval_reward_item", "run_eval", "evaluate", "policy_responder", "score_samples",
           "format_table", "parse_ks",
           "sampling_params"]


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


def sampling_params(*, max_tokens: int, block_size: int, decoding: str = "static", temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, steps_per_block: int | None = None,
                    threshold: float = 0.9):
    """SamplingParams for a decoding mode; max_tokens is rounded up to a multiple of the block size."""
    from rollout.sampling import SamplingParams

    remasking = {"static": "low_confidence_static", "dynamic": "low_confidence_dynamic"}.get(decoding, decoding)
    max_tokens = -(-int(max_tokens) // block_size) * block_size
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                          remasking=remasking, steps_per_block=steps_per_block, threshold=threshold)


# ------------------------------------------------------------------------------------------------ generation
def policy_responder(policy, *, max_tokens: int | None = None, chat_template: bool | None = None, seed: int = 0,
                     batch_size: int = 32, kv_cache: str = "auto", progress: bool = True,
                     **decoding: Any) -> Responder:
    """A responder generating with `policy` through the rollout engine (cached block diffusion for block models)."""
    from launch.data import encode_prompt
    from rl.masking import sample_seed
    from rollout.engine import TorchEngine
    from rollout.sampling import GenerationRequest

    engine = TorchEngine(policy, kv_cache=kv_cache, max_batch_size=batch_size)
    tokenizer = policy.tokenizer
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template

    def respond(evalset: EvalSet, n: int) -> list[list[Sample]]:
        params = sampling_params(max_tokens=max_tokens or evalset.max_tokens, block_size=policy.spec.block_size,
                                 **decoding)
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
                    text = item.prompt if use_chat else item.meta.get("completion_prompt", item.prompt)
                    ids = encode_prompt(tokenizer, text, chat_template=use_chat)
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
    return result["reason"].split(":", 1)[0].strip() == "correct"


def evaluate(evalset: EvalSet, responder: Responder, *, n: int = 1,
             k: Sequence[int] = (1,), **score_kwargs: Any) -> tuple[dict, list[dict]]:
    """Generate n samples per item with `responder`, score them; return (summary, per-item rows)."""
    ks = parse_ks(k)
    if max(ks) > n:
        raise ValueError(f"--k {max(ks)} > --n {n}: pass@k needs at least k samples per problem")
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
            category = r["reason"].split(":", 1)[0].strip()
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
    header = ["dataset", "items", "n", *metric_keys, "tok/fwd", "tokens", "gen s"]
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


def run_eval(checkpoint, data: str | Sequence[str], *, out: str | None = None, n: int = 1,
             k: int | str | Sequence[int] = 1, decoding: str = "static", temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, steps_per_block: int | None = None, threshold: float = 0.9,
             max_tokens: int | None = None, block_size: int | None = None, kind: str | None = None,
             trust_remote_code: bool = False, kv_cache: str = "auto", batch_size: int = 32,
             limit: int | None = None, seed: int = 0, chat_template: bool | None = None,
             prompt_field: str | None = None, answer_field: str | None = None,
             task_kwargs: dict | None = None, task_seed: int | None = None, device: str = "cpu",
             dtype: str = "float32", workers: int = 2, test_timeout_s: float = 5.0, progress: bool = True,
             print_table: bool = True, reward: Sequence[dict] | None = None,
             reward_base_dir: str | Path | None = None) -> list[dict]:
    """Evaluate `checkpoint` (a directory, or a loaded DiffusionPolicy) on each of `data`; return the summaries.

    task_kwargs / task_seed parameterise a built-in toy task's generator, whose test split must be the held-out
    split of the training data: when not given, they are read from the checkpoint's `sft.json` if it trained on
    that task (else the generator's defaults and seed 0). `seed` only seeds the sampling.
    chat_template None: use the tokenizer's chat template when it has one (as recipes' data.chat_template does).
    reward: reward specs (a recipe's `reward` section) to score every dataset with, file paths resolved against
    `reward_base_dir`; None: each item's built-in reward (`builtin_rewards`).
    """
    import torch

    from rollout.models.loading import load_policy

    datasets = [data] if isinstance(data, str) else list(data)
    if not datasets:
        raise ValueError("--data: nothing to evaluate")
    if isinstance(checkpoint, (str, Path)):
        policy = load_policy(checkpoint, kind=kind, block_size=block_size, dtype=getattr(torch, dtype),
                             device=device, trust_remote_code=trust_remote_code)
    else:
        policy = checkpoint
        if block_size is not None and block_size != policy.spec.block_size:
            raise ValueError("--block-size: pass a checkpoint directory to decode with another block size")
    # Load (and check) every dataset before any generation: bad input fails before minutes of decoding.
    evalsets = []
    for d in datasets:
        kwargs, t_seed = _task_params(checkpoint, d, task_kwargs, task_seed)
        evalsets.append(load_eval_set(d, limit=limit, prompt_field=prompt_field, answer_field=answer_field,
                                      task_kwargs=kwargs, seed=t_seed))
    responder = policy_responder(policy, max_tokens=max_tokens, chat_template=chat_template, seed=seed,
                                 batch_size=batch_size, kv_cache=kv_cache, progress=progress, decoding=decoding,
                                 temperature=temperature, top_p=top_p, top_k=top_k,
                                 steps_per_block=steps_per_block, threshold=threshold)
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for evalset in evalsets:
        summary, rows = evaluate(evalset, responder, n=n, k=k, workers=workers, test_timeout_s=test_timeout_s,
                                 reward=reward, reward_base_dir=reward_base_dir)
        summary.update(checkpoint=str(checkpoint) if isinstance(checkpoint, (str, Path)) else "<in memory>",
                       decoding=decoding, temperature=temperature, block_size=policy.spec.block_size, seed=seed,
                       reward=[spec["fn"] if isinstance(spec, dict) else spec for spec in reward] if reward is not None
                       else "built-in")
        summaries.append(summary)
        if summary["generation_errors"]:
            first = next(r for row in rows for r in row["finish_reasons"] if r.startswith("error"))
            log.warning("eval %s: %d samples failed to generate (first: %s)", evalset.name,
                        summary["generation_errors"], first)
        if out_dir:
            _write_jsonl(out_dir / f"{evalset.name}.jsonl", rows)
    if out_dir:
        atomic_write(out_dir / "summary.json", json.dumps(summaries, indent=2) + "\n")
    if print_table:
        print(format_table(summaries))
    return summaries
