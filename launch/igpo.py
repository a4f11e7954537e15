"""IGPO's group rescue in the driver (between scoring and advantages, launch/driver.py step 3b).

For each group the trigger selects (rl/inpainting.py: every response wrong, by default) whose prompt row has a
reference trace: every sample of the group is decoded again with its own hint pre-filled in the canvas, the
regenerations are scored, and up to `max_replacements` correct ones replace the group's first samples (the rest of
the group keeps its own rollouts). A group with no correct regeneration stays as it was. The reference trace is
the data row's `reference_field` column (a non-empty string; "answer" names the row's answer itself), encoded
without special tokens.
"""
from __future__ import annotations

from launch.data import DataError, Prompt
from rl.inpainting import InpaintConfig, groups_to_inpaint, inpaint_canvas, inpaint_ratios, replacements
from rl.masking import sample_generator, sample_seed
from rl.sample import ScoredSample
from rollout.sampling import GenerationRequest


def reference_trace(prompt: Prompt, field: str) -> str | None:
    """The row's reference trace, None when the row has none; a malformed one is an error naming the row."""
    value = prompt.answer if field == "answer" else prompt.meta.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"data row {prompt.index}: column {field!r} (algorithm.inpaint.reference_field) must be a "
                        f"non-empty string, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def check_reference_traces(prompts: list[Prompt], field: str) -> None:
    """Fail before training when a row's trace is malformed or no row has one (IGPO would never inpaint)."""
    traces = [reference_trace(p, field) for p in prompts]  # every row checked: a malformed one fails here
    if all(t is None for t in traces):
        raise DataError(f"algorithm.inpaint.reference_field: no data row has a {field!r} column (IGPO inpaints "
                        "reference reasoning traces from it)")


def inpainted_requests(requests: list[GenerationRequest], trace_ids: list[int], cfg: InpaintConfig, *,
                       seed: int, group_key: str) -> list[GenerationRequest]:
    """The group's requests again, each with its own hint (ratios drawn for the group, sorted) and its own seed.
    The hint is laid out over max_tokens positions; a block model whose first block holds the prompt's tail
    (`absolute` alignment, `head` tokens) drops what falls past its max_tokens - head response positions."""
    ratios = inpaint_ratios(len(requests), cfg, sample_generator(seed, group_key, stream="igpo-ratios"))
    out = []
    for j, (req, ratio) in enumerate(zip(requests, ratios, strict=True)):
        gen = sample_generator(seed, f"{group_key}:{j}", stream="igpo-hint")
        hint = inpaint_canvas(trace_ids, req.sampling.max_tokens, ratio, cfg, gen)
        out.append(GenerationRequest(req.prompt_ids, req.sampling, seed=sample_seed(seed, req.request_id,
                                                                                     stream="igpo-rollout"),
                                     request_id=f"{req.request_id}-igpo", prefill=hint))
    return out


def rescue_groups(prompts: list[Prompt], samples: list[ScoredSample], requests: list[GenerationRequest], *, n: int,
                  cfg: InpaintConfig, field: str, seed: int, tokenizer, generate, score) -> dict:
    """Rescue the triggered groups in place (samples[i] answers prompts[i // n]); `generate(requests)` returns
    trajectories, `score(prompts, samples)` scores the hinted samples, sample k against prompts[k]. Returns igpo/
    metrics."""
    usable = [not s.trajectory.finish_reason.startswith("error") for s in samples]
    groups = groups_to_inpaint([s.reward or 0.0 for s in samples], [s.reason == "correct" for s in samples],
                               [i // n for i in range(len(samples))], cfg.trigger)
    todo = []
    for g in groups:
        text = reference_trace(prompts[g], field)
        if text is not None and all(usable[g * n:(g + 1) * n]):
            todo.append((g, list(tokenizer(text, add_special_tokens=False)["input_ids"])))
    metrics = {"igpo/groups_triggered": float(len(groups)), "igpo/groups_inpainted": float(len(todo)),
               "igpo/groups_rescued": 0.0, "igpo/samples_replaced": 0.0, "igpo/hinted_accuracy": 0.0}
    if not todo:
        return metrics
    hinted_requests = []
    for g, trace in todo:
        group_requests = requests[g * n:(g + 1) * n]
        hinted_requests += inpainted_requests(group_requests, trace, cfg, seed=seed,
                                              group_key=group_requests[0].request_id)
    trajectories = generate(hinted_requests)
    hinted = [ScoredSample(t, prompt_index=samples[g * n].prompt_index, sample_index=j)
              for (g, _), chunk in zip(todo, _chunks(trajectories, n)) for j, t in enumerate(chunk)]
    score([prompts[g] for g, _ in todo for _ in range(n)], hinted)
    correct = [s.reason == "correct" for s in hinted]
    for k, (g, _) in enumerate(todo):
        swaps = replacements(correct[k * n:(k + 1) * n], cfg.max_replacements,
                             sample_generator(seed, requests[g * n].request_id, stream="igpo-pick"))
        for dst, src in swaps:
            chosen = hinted[k * n + src]
            chosen.sample_index = dst
            samples[g * n + dst] = chosen
        metrics["igpo/samples_replaced"] += len(swaps)
        metrics["igpo/groups_rescued"] += float(bool(swaps))
    metrics["igpo/hinted_accuracy"] = sum(correct) / len(correct)
    return metrics


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
