"""`diffrl sft`: supervised fine-tuning to get a starting policy, written as a normal checkpoint (`save_policy`).

    run_sft("ckpt/sft-arith", task="arithmetic", task_kwargs={"digits": 2}, steps=300, eval_items=200)
    run_sft("ckpt/sft-gsm8k", model="path/to/SDAR", data="gsm8k_train.jsonl", prompt_field="question")

Model: an existing checkpoint (`model`), or a tiny random-init one built offline (`tiny` kind and size). Data: a
toy task's train split (held-out: its test split) or a jsonl/json/parquet file (`prompt_field`, `answer_field`;
held-out: `heldout_data`). Prompts are encoded exactly as RL and evaluation encode them (`launch.data.
encode_prompt`, chat template on by default), so the checkpoint plugs into a recipe as is.

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
from typing import Any

from rl.atomic_io import atomic_output

log = logging.getLogger(__name__)

__all__ = ["run_sft", "build_examples", "count_parameters"]


def count_parameters(policy) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def _rows(task: str | None, task_kwargs: dict | None, data: str | None, heldout_data: str | None,
          prompt_field: str, answer_field: str, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if (task is None) == (data is None):
        raise ValueError("sft: give exactly one of task (a toy task name) or data (a file)")
    if task is not None:
        from rl.tasks import make_task

        made = make_task(task, seed=seed, **(task_kwargs or {}))
        return ([(r["prompt"], r["answer"]) for r in made.rows("train")],
                [(r["prompt"], r["answer"]) for r in made.rows("test")])
    from launch.data import read_rows

    def text(answer: Any) -> str:  # numbers as written (72, not 72.0); anything else as JSON
        if isinstance(answer, float) and answer.is_integer():
            return str(int(answer))
        return answer if isinstance(answer, str) else json.dumps(answer) if isinstance(answer, (list, dict)) \
            else str(answer)

    def pairs(path: str, where: str) -> list[tuple[str, str]]:
        return [(r[prompt_field], text(r[answer_field])) for r in read_rows(path, prompt_field, answer_field,
                                                                             where=where)]

    return pairs(data, "sft.data"), (pairs(heldout_data, "sft.heldout_data") if heldout_data else [])


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


def _policy(model: str | None, tiny: str, size: dict[str, Any], kind: str | None, block_size: int | None,
            trust_remote_code: bool, device: str, seed: int):
    from rollout.models.loading import load_policy
    from rollout.models.tiny import make_tiny_policy

    if model is not None:
        return load_policy(model, kind=kind, block_size=block_size, device=device,
                           trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="diffrl-tiny-") as tmp:
        path = make_tiny_policy(tiny, Path(tmp) / "init", seed=seed, block_size=block_size,
                                **{k: v for k, v in size.items() if v is not None})
        return load_policy(path, device=device)


def run_sft(out: str, *, model: str | None = None, tiny: str = "block", hidden_size: int = 192,
            num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
            block_size: int | None = None, kind: str | None = None, trust_remote_code: bool = False,
            task: str | None = None, task_kwargs: dict | None = None, data: str | None = None,
            heldout_data: str | None = None, prompt_field: str = "prompt", answer_field: str = "answer",
            num_heldout: int = 256, chat_template: bool = True, steps: int = 300, batch_size: int = 32,
            lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 20, schedule: str = "cosine",
            grad_clip: float = 1.0, objective: str = "auto", elbo_weighting: bool = False,
            response_len: int | None = None, seed: int = 0, eval_items: int = 0, eval_decoding: str = "static",
            eval_every: int = 0, device: str = "cpu", overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune and write the checkpoint to `out`; return the summary also stored in `out/sft.json`.

    With neither `task` nor `data`, trains on the arithmetic task. `eval_items` > 0 measures greedy accuracy on
    that many held-out problems after training (toy tasks: the task's test split; files: `heldout_data`)."""
    import torch

    from rl.sft import SFTConfig, resolve_objective, train_sft
    from rollout.models.loading import save_policy

    out_dir = Path(out)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"sft: output directory {out_dir} exists (pass overwrite=True / --overwrite)")
    if task is None and data is None:
        task = "arithmetic"
    config = SFTConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_steps=warmup_steps, schedule=schedule, grad_clip=grad_clip, objective=objective,
                       elbo_weighting=elbo_weighting, response_len=response_len, seed=seed, eval_every=eval_every)
    train_pairs, heldout_pairs = _rows(task, task_kwargs, data, heldout_data, prompt_field, answer_field, seed)
    size = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                intermediate_size=intermediate_size or 4 * hidden_size)
    policy = _policy(model, tiny, size, kind, block_size, trust_remote_code, device, seed)
    examples = build_examples(policy, train_pairs, chat_template=chat_template, response_len=response_len)
    heldout = build_examples(policy, heldout_pairs[:num_heldout], chat_template=chat_template,
                             response_len=examples[0].response_ids.numel() if not policy.spec.is_block else None)
    log_lines: list[str] = []
    with torch.random.fork_rng(devices=[]):  # nothing here may touch the caller's global stream (dropout etc.)
        result = train_sft(policy, examples, config, heldout=heldout, progress=progress,
                           on_log=lambda rec: log_lines.append(json.dumps(rec)))
    summary: dict[str, Any] = {
        "model": model or f"tiny:{tiny}", "kind": policy.spec.kind, "block_size": policy.spec.block_size,
        "parameters": count_parameters(policy), "size": None if model else size,
        "data": {"task": task, "task_kwargs": task_kwargs or {}, "task_seed": seed, "file": data,
                 "heldout_file": heldout_data, "train_examples": len(examples), "heldout_examples": len(heldout),
                 "chat_template": chat_template},
        "config": dataclasses.asdict(config),
        "objective": resolve_objective(policy, objective),
        "heldout_masked_ce_before": result.heldout_before, "heldout_masked_ce_after": result.heldout_after,
        "final_train_loss": result.history[-1]["loss"], "train_wall_s": result.wall_s,
    }
    if eval_items > 0:
        summary["eval"] = _greedy_accuracy(policy, task, task_kwargs, heldout_data, eval_items, seed,
                                           chat_template, eval_decoding, progress, prompt_field, answer_field)
    with atomic_output(out_dir) as tmp:  # the whole checkpoint directory appears at once (or not at all)
        save_policy(policy, tmp)
        (tmp / "sft.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (tmp / "sft_log.jsonl").write_text("\n".join(log_lines) + "\n")
    log.info("sft: wrote %s (%d parameters, held-out masked CE %.3f -> %.3f)", out_dir, summary["parameters"],
             result.heldout_before or float("nan"), result.heldout_after or float("nan"))
    return summary


def _greedy_accuracy(policy, task, task_kwargs, heldout_data, eval_items, seed, chat_template, decoding, progress,
                     prompt_field, answer_field) -> dict | None:
    from launch.evaluate import run_eval

    source = task if task is not None else heldout_data
    if source is None:
        log.warning("sft: eval_items set but there is no held-out data to evaluate on (heldout_data)")
        return None
    custom = task is None and (prompt_field, answer_field) != ("prompt", "answer")
    fields = {"prompt_field": prompt_field, "answer_field": answer_field} if custom else {}
    summaries = run_eval(policy, source, limit=eval_items, seed=seed, task_kwargs=task_kwargs or {},
                         task_seed=seed, chat_template=chat_template, decoding=decoding, progress=progress,
                         print_table=False, **fields)
    s = summaries[0]
    return {"items": s["items"], "accuracy": s["avg@1"], "decoding": decoding, "tokens_per_forward":
            s["tokens_per_forward"], "gen_wall_s": s["gen_wall_s"], "reasons": s["reasons"]}
