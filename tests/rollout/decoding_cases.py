"""What the decoding tests (and benchmarks/decoding_syncs.py) share: a tiny policy pushed towards EOS, the remasking
policies at small-step settings, and a memory budget of exactly N KV cache rows (not a test module itself)."""
from __future__ import annotations

from rollout.decoding import cache_columns
from rollout.decoding.kv_cache import kv_bytes_per_token
from rollout.decoding.state import Row
from rollout.memory_budget import MemoryBudget, parse_memory_budget
from rollout.models.policy import DiffusionPolicy

# The remasking policies every decoder runs, at settings that decode a 16-token response in a few steps. Users add
# their EOSER variants and, for Dream, ORIGIN after them (keep the order: tests draw prompts policy by policy).
EVERY_REMASKING = {
    "static": dict(remasking="low_confidence_static", steps_per_block=2),
    "dynamic": dict(remasking="low_confidence_dynamic", threshold=0.05),
    "random": dict(remasking="random", steps_per_block=2),
    "entropy": dict(remasking="entropy", steps_per_block=2),
    "topk_margin": dict(remasking="topk_margin", steps_per_block=2),
    "sequential": dict(remasking="sequential"),
    "entropy_bounded": dict(remasking="entropy_bounded", entropy_bound=3.0),
}
EOSER = dict(remasking="low_confidence_static", eoser_gamma_min=0.2)
ORIGIN = dict(remasking="origin", steps_per_block=4)  # Dream's own order (Dream only)


class EosBiased(DiffusionPolicy):
    """A tiny policy whose logits are pushed towards EOS by `bonus`, so rows stop at different blocks (rows leave
    the batch mid-decode)."""

    def __init__(self, base: DiffusionPolicy, bonus: float):
        super().__init__(base.model, base.tokenizer, base.spec, base.source)
        self.bonus = bonus

    def logits_from_hidden(self, hidden):
        logits = super().logits_from_hidden(hidden)
        logits[..., self.spec.eos_token_id] += self.bonus
        return logits


def slot_bytes(engine, requests) -> int:
    """Bytes of one KV cache row for these requests (the engine's arithmetic, written out here)."""
    policy = engine.policy
    rows = [Row(i, r, policy.spec, policy.device) for i, r in enumerate(requests)]
    return kv_bytes_per_token(policy.causal_lm.config, policy.dtype) * cache_columns(policy.spec, rows)


def budget_for_slots(engine, requests, slots: int) -> MemoryBudget:
    """A memory budget holding exactly `slots` rows of KV cache for these requests (half a row to spare)."""
    per_row = slot_bytes(engine, requests)
    return parse_memory_budget(slots * per_row + per_row // 2)
