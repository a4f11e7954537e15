"""Which answer shapes does a checkpoint's greedy decode give on the held-out Countdown items? (issue 19)

RL from the tiny SFT model was seen to break the same held-out items across seeds and variants; the broken answers
were sums of all the numbers ("5+1+11"). This counts, per checkpoint, the greedy answers that are the plain sum of
the given numbers, how many of the items' targets are that sum, and the accuracy inside and outside those items.
On the shortcut-free task (no target is the sum) it also names each greedy answer's *template* (its numbers
replaced by their rank among the given ones: `L+S-M` = largest + smallest - middle) and counts the three most
common templates: a run that collapses onto one rule shows it as one template on most answers.

    python benchmarks/learning_modes.py /work/bench/fid/sft CKPT ...
"""
from __future__ import annotations

import argparse
import re

from benchmarks.learning import SETUPS


def _is_plain_sum(answer: str, numbers: list[int]) -> bool:
    parts = answer.strip().split("+")
    return len(parts) == len(numbers) and all(re.fullmatch(r"\d+", p) for p in parts) and \
        sorted(int(p) for p in parts) == sorted(numbers)


def answer_template(answer: str, numbers: list[int]) -> str | None:
    """The answer with each number replaced by its rank among `numbers` (L, M, S for three; ties take the next
    free rank), or None when the answer does not use exactly those numbers."""
    found = [int(x) for x in re.findall(r"\d+", answer)]
    if sorted(found) != sorted(numbers):
        return None
    ranked = sorted(range(len(numbers)), key=lambda i: -numbers[i])
    names = "LMS" if len(numbers) == 3 else [f"n{k}" for k in range(len(numbers))]
    free = {i: names[r] for r, i in enumerate(ranked)}
    by_value: dict[int, list[str]] = {}
    for i in ranked:
        by_value.setdefault(numbers[i], []).append(free[i])
    return re.sub(r"\d+", lambda m: by_value[int(m.group())].pop(0), answer.strip())


# Distinct (L, M, S) triples: two templates are the same rule (`L+M-S`, `M+L-S`) when they agree on all of them.
_PROBE_TRIPLES = ((17, 11, 4), (19, 7, 3), (13, 12, 2), (20, 9, 5), (16, 6, 1), (18, 14, 8))


def template_rule(template: str) -> tuple | None:
    """The rule a three-number template computes, as its values on _PROBE_TRIPLES (None: not a +-*/ template)."""
    from rl.tasks.countdown import evaluate

    values = []
    for triple in _PROBE_TRIPLES:
        text = template
        for name, value in zip("LMS", triple):
            text = text.replace(name, str(value))
        values.append(evaluate(text))
    return None if any(v is None for v in values) else tuple(values)


def answer_shapes(ckpt: str, limit: int | None = None) -> dict:
    from launch.evaluate import (
        EvalRun,
        evaluate_sets,
        load_checkpoint_policy,
        load_eval_sets,
    )
    from rl.tasks import make_task

    task = make_task("countdown", seed=0, **SETUPS["countdown"]["task_kwargs"])
    rows = task.rows("test")[:limit]
    limit = len(rows)
    run = EvalRun(data=["countdown"], rollout={"temperature": 0.0, "batch_size": 64}, limit=limit,
                  task_kwargs=SETUPS["countdown"]["task_kwargs"], task_seed=0, print_table=False, max_tokens=16,
                  overlap="allow")
    (evalset,) = load_eval_sets(ckpt, run, sources=[])
    ((_, results),) = evaluate_sets(load_checkpoint_policy(ckpt, run), [evalset], run, checkpoint_name=ckpt,
                                    progress=False)
    out = {"items": len(rows), "target_is_sum": 0, "answers_plain_sum": 0, "correct": 0,
           "correct_where_target_is_sum": 0, "correct_elsewhere": 0}
    templates: dict[str, list[int]] = {}  # template -> [answers, right ones]
    for row, res in zip(rows, results):
        numbers = [int(x) for x in row["prompt"].split("->")[0].split(",")]
        target = int(row["prompt"].split("->")[1].rstrip(":"))
        is_sum = sum(numbers) == target
        out["target_is_sum"] += is_sum
        out["answers_plain_sum"] += _is_plain_sum(res["responses"][0], numbers)
        out["correct"] += res["num_correct"]
        out["correct_where_target_is_sum" if is_sum else "correct_elsewhere"] += res["num_correct"]
        template = answer_template(res["responses"][0].split("\n")[0], numbers)
        if template is not None:
            count = templates.setdefault(template, [0, 0])
            count[0] += 1
            count[1] += res["num_correct"]
    rules: dict[tuple | str, list] = {}  # rule -> [its most used spelling, answers, right ones]
    for template, (n, k) in sorted(templates.items(), key=lambda kv: -kv[1][0]):
        rule = template_rule(template) if len(numbers) == 3 else None
        entry = rules.setdefault(rule if rule is not None else template, [template, 0, 0])
        entry[1] += n
        entry[2] += k
    top = sorted(rules.values(), key=lambda e: -e[1])[:3]
    out["top_rules"] = {t: {"answers": n, "right": k} for t, n, k in top}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    for ckpt in args.checkpoints:
        print(ckpt, answer_shapes(ckpt), flush=True)


if __name__ == "__main__":
    main()
