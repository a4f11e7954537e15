"""Paired before/after evaluation: two checkpoints on the same items, the same decoding and the same sample seeds.

    diffrl eval runs/x --baseline sft/ --data countdown --out evals/x_vs_sft
    run_paired_eval(CKPT, BASELINE, EvalRun(data=["countdown"], ...))     # -> one comparison per dataset

Each item is decoded by both checkpoints with seed sample_seed(run.seed, id, j, "eval") (launch/evaluate.py), so
the only difference between the two columns is the weights. Per dataset: accuracy before and after, items fixed
(wrong -> right) and broken (right -> wrong), the exact McNemar p-value (two-sided, from the flips; the exact
sign test on per-item accuracies when n > 1) and a paired bootstrap interval of the accuracy difference, seeded
by run.seed (launch/eval_stats.py). The item sets must be identical: both checkpoints' eval sets are built (a toy
task's test split from each one's recorded generator parameters) and any difference is a one-line error, never a
comparison of different items. Items either checkpoint was trained on are refused as in `diffrl eval`.

Output with `out`: `<out>/<dataset>.paired.jsonl` (one row per item: id, prompt, reference, before / after scores
and responses, `change`: fixed | broken | same), `<out>/paired.json` (the comparisons and both summaries).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from launch.eval_stats import ItemSetMismatch, PairedComparison, compare_paired
from launch.evaluate import (EvalRun, checkpoint_name, checkpoint_training_sources, evaluate_sets,
                             load_checkpoint_policy, load_eval_sets)
from launch.evaluate_data import EvalSet
from rl.atomic_io import atomic_write

__all__ = ["run_paired_eval", "paired_rows", "format_paired_table", "check_same_items"]


def check_same_items(new: Sequence[EvalSet], base: Sequence[EvalSet], *, new_name: str, base_name: str) -> None:
    """One-line ItemSetMismatch unless both lists hold the same datasets with the same item ids and prompts."""
    for a, b in zip(new, base, strict=True):
        ids = [item.id for item in a.items]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ItemSetMismatch(f"--data {a.name}: item id {duplicate!r} appears twice: items cannot be paired")
        mine = {item.id: item.prompt for item in a.items}
        theirs = {item.id: item.prompt for item in b.items}
        if mine != theirs:
            only_new, only_base = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            changed = sorted(i for i in set(mine) & set(theirs) if mine[i] != theirs[i])
            example = (only_new or only_base or changed)[0]
            raise ItemSetMismatch(
                f"--data {a.name}: {new_name} and --baseline {base_name} are evaluated on different items "
                f"({len(only_new)} only for the checkpoint, {len(only_base)} only for the baseline, {len(changed)} "
                f"with another prompt; e.g. id {example!r}): their task parameters or data differ; pass the same "
                f"items to both (e.g. a data file)")


def paired_rows(evalset: EvalSet, before: list[dict], after: list[dict], n: int) -> list[dict]:
    """Per-item rows of a paired evaluation: scores are the fraction of the item's n samples that are correct."""
    rows = []
    for item, b, a in zip(evalset.items, before, after, strict=True):
        score_b, score_a = b["num_correct"] / n, a["num_correct"] / n
        rows.append({"id": item.id, "prompt": item.prompt, "reference": b["reference"], "before": score_b,
                     "after": score_a, "change": "fixed" if score_a > score_b else "broken" if score_a < score_b
                     else "same", "before_responses": b["responses"], "after_responses": a["responses"]})
    return rows


def run_paired_eval(checkpoint, baseline, run: EvalRun, *, progress: bool = True,
                    resamples: int = 10_000) -> list[dict]:
    """Evaluate `baseline` and `checkpoint` on the same items; return one record per dataset (see module doc)."""
    new_name, base_name = checkpoint_name(checkpoint), checkpoint_name(baseline)
    sources = checkpoint_training_sources(checkpoint) + checkpoint_training_sources(baseline)
    evalsets = load_eval_sets(checkpoint, run, sources)
    check_same_items(evalsets, load_eval_sets(baseline, run, sources), new_name=new_name, base_name=base_name)
    results = {}
    for role, ckpt in (("baseline", baseline), ("checkpoint", checkpoint)):
        policy = load_checkpoint_policy(ckpt, run)
        results[role] = evaluate_sets(policy, evalsets, run, checkpoint_name=checkpoint_name(ckpt), progress=progress)
        del policy  # one model in memory at a time
    out_dir = Path(run.out) if run.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, evalset in enumerate(evalsets):
        (sum_b, rows_b), (sum_a, rows_a) = results["baseline"][i], results["checkpoint"][i]
        rows = paired_rows(evalset, rows_b, rows_a, run.n)
        comparison = compare_paired({r["id"]: r["before"] for r in rows}, {r["id"]: r["after"] for r in rows},
                                    resamples=resamples, seed=run.seed, what=f"--data {evalset.name}")
        records.append({"dataset": evalset.name, "checkpoint": new_name, "baseline": base_name, "n": run.n,
                        "comparison": comparison.to_dict(), "summary": sum_a, "baseline_summary": sum_b})
        if out_dir:
            atomic_write(out_dir / f"{evalset.name}.paired.jsonl",
                         "".join(json.dumps(r, default=str) + "\n" for r in rows))
    if out_dir:
        atomic_write(out_dir / "paired.json", json.dumps(records, indent=2, default=str) + "\n")
    if run.print_table:
        print(format_paired_table(records))
    return records


def format_paired_table(records: Sequence[dict]) -> str:
    """dataset | items | baseline % | checkpoint % | diff (CI) | fixed | broken | p."""
    header = ["dataset", "items", "baseline %", "checkpoint %", "diff pts [CI]", "fixed", "broken", "p (exact)"]
    lines = [header]
    for record in records:
        c = PairedComparison(**record["comparison"])
        lines.append([record["dataset"], str(c.items), f"{100 * c.before:.1f}", f"{100 * c.after:.1f}",
                      f"{100 * c.diff:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]", str(c.fixed),
                      str(c.broken), f"{c.p_value:.3g}"])
    widths = [max(len(row[col]) for row in lines) for col in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    confidence = records[0]["comparison"]["confidence"] if records else 0.95
    test = "McNemar" if all(r["n"] == 1 for r in records) else "sign test on per-item accuracy"
    text.append(f"(paired: same items and sample seeds; p: exact two-sided {test}; CI: {100 * confidence:.0f}% "
                f"paired bootstrap)")
    return "\n".join(text)
