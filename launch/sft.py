"""`diffrl sft`: supervised fine-tuning to get a starting policy, written as a normal checkpoint (`save_policy`).

    run_sft(SFTRun(out="ckpt/sft-arith", data={"task": "arithmetic", "task_kwargs": {"digits": 2}},
                   training={"steps": 300}, eval_items=200))
    run_sft(SFTRun.from_recipe(load_recipe("recipes/tracerl-trado-math.yaml"), "ckpt/sft-trado"))

What it does is one typed record, `SFTRun`, built from the recipe's own sections: `model` (a checkpoint `path`, or
a `tiny` random-init one built offline, sized by `tiny_size`), `data` (a toy `task`'s train split, held-out: its
test split; or a `train` file with `prompt_field` / `answer_field`, held-out: the `eval` file; `chat_template`) and
`training` (rl.sft.SFTConfig: steps, batch size, lr, ..., and the seed of everything). Prompts are encoded exactly
as RL and evaluation encode them (`launch.data.encode_prompt`), so the checkpoint plugs into a recipe as is.

The checkpoint directory is written under a temporary name and renamed when complete; it also holds `sft.json`
(configuration, model size, held-out masked loss before/after, wall time, optional greedy accuracy) and
`sft_log.jsonl` (one line per step).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from launch.data import task_seed_of
from launch.numerics import numerics_record
from launch.recipe import DataSection, ModelSection, Recipe, RecipeError
from launch.recipe_sections import Section
from rl.atomic_io import atomic_output
from rl.sft import SFTConfig

log = logging.getLogger(__name__)

__all__ = ["SFTRun", "TinySize", "run_sft", "build_examples", "count_parameters"]


class TinySize(Section):
    """The size of a tiny random-init model (model.tiny)."""

    hidden_size: int = Field(192, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int | None = Field(None, ge=1)  # None: 4 * hidden_size


class SFTRun(Section):
    """Everything `diffrl sft` does. `model` and `data` are a recipe's sections (of which SFT reads model.path /
    tiny / tiny_vocab / kind / block_size / trust_remote_code and data.task / task_kwargs / train / eval /
    prompt_field / answer_field / chat_template)."""

    out: str = Field(min_length=1)  # the checkpoint directory to write
    model: ModelSection = ModelSection(tiny="qwen3-block")
    tiny_size: TinySize = TinySize()
    data: DataSection = DataSection(task="arithmetic")
    training: SFTConfig = SFTConfig()
    num_heldout: int = Field(256, ge=0)  # held-out examples scored for the masked loss
    eval_items: int = Field(0, ge=0)  # > 0: greedy accuracy on this many held-out problems after training
    eval_decoding: Literal["static", "dynamic"] = "static"
    device: str = "cpu"
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_source_each(self) -> SFTRun:
        if (self.model.path is None) == (self.model.tiny is None):
            raise ValueError("sft: model: give exactly one of path (a checkpoint) or tiny (a model built offline)")
        if (self.data.task is None) == (self.data.train is None):
            raise ValueError("sft: data: give exactly one of task (a toy task name) or train (a file)")
        return self

    @classmethod
    def from_recipe(cls, recipe: Recipe, out: str, **changes: Any) -> SFTRun:
        """SFT of the recipe's model on the recipe's data, seeded by the recipe (`changes`: other fields)."""
        training = changes.pop("training", SFTConfig(seed=recipe.seed))
        return cls(out=out, model=recipe.model, data=recipe.data, training=training, **changes)


def count_parameters(policy) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def _answer_text(answer: Any) -> str:
    """Numbers as written (72, not 72.0); anything else as JSON."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return answer if isinstance(answer, str) else json.dumps(answer) if isinstance(answer, (list, dict)) \
        else str(answer)


def _rows(data: DataSection, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, answer) pairs to train on and to hold out."""
    if data.task is not None:
        from rl.tasks import make_task

        made = make_task(data.task, seed=seed, **data.task_kwargs)
        return ([(r["prompt"], r["answer"]) for r in made.rows("train")],
                [(r["prompt"], r["answer"]) for r in made.rows("test")])
    from launch.data import read_rows

    def pairs(path: str, where: str) -> list[tuple[str, str]]:
        rows = read_rows(path, data.prompt_field, data.answer_field, where=where)
        return [(r[data.prompt_field], _answer_text(r[data.answer_field])) for r in rows]

    return pairs(data.train, "sft.data.train"), (pairs(data.eval, "sft.data.eval") if data.eval else [])


def build_examples(policy, pairs: list[tuple[str, str]], *, chat_template: bool = True,
                   response_len: int | None = None) -> list:
    """(prompt, answer) text pairs -> SFT examples (prompt ids under the chat template, answer + EOS padding)."""
    from launch.data import encode_prompt
    from rl.sft import make_example

    tok = policy.tokenizer
    encoded = [(encode_prompt(tok, p, chat_template=chat_template), tok(a, add_special_tokens=False)["input_ids"])
               for p, a in pairs]
    if response_len is None and not policy.spec.is_block and encoded:
        # Full attention decodes a fixed canvas: train every example at the longest answer's length (whole blocks).
        longest = max(len(a) for _, a in encoded) + 1
        response_len = -(-longest // policy.spec.block_size) * policy.spec.block_size
    return [make_example(p, a, policy.spec, response_len) for p, a in encoded]


def _policy(run: SFTRun, seed: int):
    from rollout.models.loading import load_policy
    from rollout.models.tiny import make_tiny_policy

    model = run.model
    kind = None if model.kind == "auto" else model.kind
    if model.path is not None:
        return load_policy(model.path, kind=kind, block_size=model.block_size, device=run.device,
                           trust_remote_code=model.trust_remote_code)
    size = run.tiny_size.model_dump()
    size["intermediate_size"] = size["intermediate_size"] or 4 * size["hidden_size"]
    with tempfile.TemporaryDirectory(prefix="diffrl-tiny-") as tmp:
        path = make_tiny_policy(model.tiny, Path(tmp) / "init", vocab=model.tiny_vocab or "small", seed=seed,
                                block_size=model.block_size, **size)
        return load_policy(path, device=run.device)


def run_sft(run: SFTRun, *, progress: bool = True) -> dict:
    """Fine-tune and write the checkpoint to `run.out`; return the summary also stored in `run.out/sft.json`."""
    import torch

    from rl.sft import resolve_objective, train_sft
    from rollout.models.loading import save_policy

    out_dir, config, data = Path(run.out), run.training, run.data
    if out_dir.exists() and not run.overwrite:
        raise FileExistsError(f"sft: output directory {out_dir} exists (set overwrite / pass --overwrite)")
    train_pairs, heldout_pairs = _rows(data, task_seed_of(data, config.seed))
    policy = _policy(run, config.seed)
    if policy.spec.kind == "diffusion_gemma":  # its canvas decoder has no [prompt | clean | noisy] SFT layout
        raise RecipeError("sft: model: DiffusionGemma checkpoints are not supported by diffrl sft")
    examples = build_examples(policy, train_pairs, chat_template=data.chat_template, response_len=config.response_len)
    heldout = build_examples(policy, heldout_pairs[:run.num_heldout], chat_template=data.chat_template,
                             response_len=examples[0].response_ids.numel() if not policy.spec.is_block else None)
    log_lines: list[str] = []
    with torch.random.fork_rng(devices=[]):  # nothing here may touch the caller's global stream (dropout etc.)
        result = train_sft(policy, examples, config, heldout=heldout, progress=progress,
                           on_log=lambda rec: log_lines.append(json.dumps(rec)))
    summary: dict[str, Any] = {
        "model": run.model.path or f"tiny:{run.model.tiny}", "kind": policy.spec.kind,
        "block_size": policy.spec.block_size, "parameters": count_parameters(policy),
        "size": None if run.model.path else run.tiny_size.model_dump(),
        "data": {"task": data.task, "task_kwargs": data.task_kwargs, "task_seed": task_seed_of(data, config.seed),
                 "file": data.train,
                 "heldout_file": data.eval, "train_examples": len(examples), "heldout_examples": len(heldout),
                 "chat_template": data.chat_template},
        "config": dataclasses.asdict(config),
        "objective": resolve_objective(policy, config.objective),
        "heldout_masked_ce_before": result.heldout_before, "heldout_masked_ce_after": result.heldout_after,
        "final_train_loss": result.history[-1]["loss"], "train_wall_s": result.wall_s,
        "numerics": numerics_record(),
    }
    if run.eval_items > 0:
        summary["eval"] = _greedy_accuracy(policy, run, progress)
    with atomic_output(out_dir) as tmp:  # the whole checkpoint directory appears at once (or not at all)
        save_policy(policy, tmp)
        (tmp / "sft.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (tmp / "sft_log.jsonl").write_text("\n".join(log_lines) + "\n")
    log.info("sft: wrote %s (%d parameters, held-out masked CE %.3f -> %.3f)", out_dir, summary["parameters"],
             result.heldout_before or float("nan"), result.heldout_after or float("nan"))
    return summary


def _greedy_accuracy(policy, run: SFTRun, progress: bool) -> dict | None:
    from launch.evaluate import EvalRun, run_eval

    data, seed = run.data, run.training.seed
    source = data.task if data.task is not None else data.eval
    if source is None:
        log.warning("sft: eval_items set but there is no held-out data to evaluate on (data.eval)")
        return None
    custom = data.task is None and (data.prompt_field, data.answer_field) != ("prompt", "answer")
    fields = {"prompt_field": data.prompt_field, "answer_field": data.answer_field} if custom else {}
    remasking = {"static": "low_confidence_static", "dynamic": "low_confidence_dynamic"}[run.eval_decoding]
    evaluation = EvalRun(data=[source], limit=run.eval_items, seed=seed, task_kwargs=data.task_kwargs,
                         task_seed=task_seed_of(data, seed),
                         chat_template=data.chat_template, print_table=False, **fields,
                         rollout={"remasking": remasking, "temperature": 0.0, "batch_size": 32})
    s = run_eval(policy, evaluation, progress=progress)[0]
    return {"items": s["items"], "accuracy": s["avg@1"], "decoding": run.eval_decoding, "tokens_per_forward":
            s["tokens_per_forward"], "gen_wall_s": s["gen_wall_s"], "reasons": s["reasons"]}
