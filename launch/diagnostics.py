"""Per-step diagnostics a researcher reads when RL does not improve held-out accuracy, and where each comes from.

| metric (metrics.jsonl / TensorBoard) | what it says | computed in |
|---|---|---|
| `learner/entropy` | mean predictive entropy (nats) at the scored response tokens: collapse or drift | rl/algorithms/core.py (learner.log_entropy) |
| `adv/frac_groups_zero_std` | groups whose samples all got the same reward: no group-relative signal | rl/advantages.py |
| `learner/clipfrac` (`_low`, `_high`) | tokens whose ratio was clipped (ratio-based losses) | rl/algorithms/core.py |
| `learner/approx_kl`, `learner/kl` | KL(old or reference, current) estimate / the penalty's KL | rl/algorithms/core.py |
| `adv/adv_std`, `adv/adv_abs_mean` (`learner/adv_*`) | advantage scale of the kept samples (group / token level) | rl/advantages.py, core.py |
| `rollout/tokens_per_forward` | tokens decoded per model forward (dynamic decoding > 1) | rollout/worker.py |
| `eval/probe/greedy_accuracy`, `eval/probe/sampled_accuracy` | greedy vs sampled accuracy on a FIXED probe set (the first `trainer.probe_items` held-out prompts, `trainer.probe_samples` samples each with seeds fixed across evaluations): the gap between the mode and the distribution RL trains on | here |

The probe's samples decode as the rollouts do (the recipe's rollout section: temperature, remasking) with seeds
that depend on the prompt and sample index only, so two evaluations differ by the weights alone.
"""
from __future__ import annotations

from typing import Any, Sequence

from rewards.result import reason_category

__all__ = ["probe_requests", "probe_metrics"]


def probe_requests(prompts: Sequence[Any], sampling: Any, *, seed: int, items: int, samples: int) -> list[tuple]:
    """(prompt, GenerationRequest) for `samples` samples of each of the first `items` prompts, seeded by
    (run seed, prompt index, sample index) alone."""
    from rl.masking import sample_seed
    from rollout.sampling import GenerationRequest

    return [(p, GenerationRequest(list(p.prompt_ids), sampling, seed=sample_seed(seed, f"{p.index}:{j}", stream="probe"),
                                  request_id=f"probe-p{p.index}-s{j}"))
            for p in list(prompts)[:items] for j in range(samples)]


def _accuracy(results: Sequence[dict]) -> float:
    return sum(reason_category(r["reason"]) == "correct" for r in results) / len(results)


def probe_metrics(greedy_results: Sequence[dict], sampled_results: Sequence[dict], samples: int) -> dict[str, float]:
    """Greedy and sampled accuracy on the probe prompts (greedy_results: one per probe prompt, in order;
    sampled_results: `samples` per prompt)."""
    if not sampled_results:
        return {}
    if len(sampled_results) != samples * len(greedy_results):
        raise ValueError(f"probe: {len(sampled_results)} sampled results for {len(greedy_results)} prompts x "
                         f"{samples} samples")
    greedy, sampled = _accuracy(greedy_results), _accuracy(sampled_results)
    return {"eval/probe/greedy_accuracy": greedy, "eval/probe/sampled_accuracy": sampled,
            "eval/probe/greedy_minus_sampled": greedy - sampled, "eval/probe/num_prompts": len(greedy_results),
            "eval/probe/samples": samples}
