"""Memory budget: the KV cache sized from rollout.memory_budget, continuous batching under a budget smaller than
batch x capacity (same tokens as an unbudgeted run), evictions that allocate nothing, fill metrics, sleep/wake."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rollout.decoding.block as block_decoding
from rollout.decoding.kv_cache import (
    RaggedKVCache,
    compaction_moves,
)
from rollout.engine import TorchEngine
from rollout.memory_budget import parse_memory_budget
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.worker import merge_rollout_metrics
from tests.rollout.decoding_cases import EosBiased, slot_bytes


class AllocationCounter(TorchDispatchMode):
    """Bytes of every tensor an aten op allocates (outputs that do not alias one of its inputs' storages)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _requests(policy, lengths, max_tokens, params):
    g = torch.Generator().manual_seed(3)
    return [GenerationRequest(torch.randint(10, len(policy.tokenizer), (n,), generator=g),
                              SamplingParams(**{**params, "max_tokens": m}), seed=100 + i, request_id=f"r{i}")
            for i, (n, m) in enumerate(zip(lengths, max_tokens))]


def _assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.request_id == y.request_id and x.finish_reason == y.finish_reason in ("eos", "length")
        assert torch.equal(x.response_ids, y.response_ids) and torch.equal(x.step_map, y.step_map)
        assert x.nfe == y.nfe
        assert torch.allclose(x.logprobs, y.logprobs, atol=1e-5)


@pytest.mark.parametrize("params,eos_bonus", [
    ({"temperature": 1.0, "remasking": "low_confidence_dynamic", "top_k": 20}, 1.5),
    ({"temperature": 0.0, "remasking": "low_confidence_static", "steps_per_block": 2}, 0.6),
    ({"temperature": 0.8, "remasking": "random"}, 1.5),  # the remasking choice draws from each row's generator
])
def test_block_engine_under_a_small_budget_admits_as_rows_finish_with_the_same_tokens(tiny_policies, monkeypatch,
                                                                                      params, eos_bonus):
    policy = EosBiased(tiny_policies["sdar"], bonus=eos_bonus)
    requests = _requests(policy, (6, 15, 2, 11, 6, 9, 3), (8, 24, 16, 24, 12, 20, 8), params)
    free = TorchEngine(policy, kv_cache="block").generate(requests)
    assert len({t.nfe for t in free}) > 2, "rows should finish at different steps"
    engine = TorchEngine(policy, kv_cache="block")
    engine.memory_budget = parse_memory_budget(2 * slot_bytes(engine, requests) + 100)  # 2 rows, not 3
    evictions, cache_bytes = [], []
    original = block_decoding._evict

    def measured_evict(rows, cache_len, pending, cache, block_buf, valid_buf):
        finished = sum(r.finish_reason is not None for r in rows)
        with AllocationCounter() as counter:
            out = original(rows, cache_len, pending, cache, block_buf, valid_buf)
        if finished:
            evictions.append(counter.bytes)
            cache_bytes.append(cache.nbytes)
        return out

    monkeypatch.setattr(block_decoding, "_evict", measured_evict)
    budgeted = engine.generate(requests)
    _assert_same(free, budgeted)
    m = engine.memory_metrics()
    budget = m["rollout/memory_budget_bytes"]
    assert m["rollout/cache_slots"] == 2 and m["rollout/cache_rows_peak"] == 2
    assert 0 < m["rollout/cache_allocated_bytes"] <= budget < len(requests) * slot_bytes(engine, requests)
    assert 1 < m["rollout/cache_rows_mean"] <= 2 and 0 < m["rollout/cache_fill_mean"] <= m["rollout/cache_fill_peak"] <= 1
    # Every row but the last two left while others decoded; evictions allocated nothing, so the cache's peak
    # during an eviction is the cache itself, within the budget.
    assert len(evictions) >= len(requests) - 2
    assert max(evictions) == 0 and max(cache_bytes) <= budget


def test_every_row_of_the_batch_finishing_at_once_empties_the_slots_for_the_next(tiny_policies, monkeypatch):
    """EOS ruled out and one schedule: every row stops on its length at the same step, so each eviction empties
    every slot at once (no survivor to move) and the next rows are admitted into all of them."""
    policy = EosBiased(tiny_policies["sdar"], bonus=-1e4)
    params = {"temperature": 0.7, "remasking": "low_confidence_static", "steps_per_block": 2}
    requests = _requests(policy, (6, 15, 2, 11, 7), (16,) * 5, params)
    free = TorchEngine(policy, kv_cache="block").generate(requests)
    assert {t.finish_reason for t in free} == {"length"} and len({t.nfe for t in free}) == 1
    engine = TorchEngine(policy, kv_cache="block")
    engine.memory_budget = parse_memory_budget(2 * slot_bytes(engine, requests) + 100)
    emptied, original = [], block_decoding._evict

    def watched(rows, *args):
        out = original(rows, *args)
        if rows and all(r.finish_reason is not None for r in rows):
            emptied.append((len(rows), len(out[0])))
        return out

    monkeypatch.setattr(block_decoding, "_evict", watched)
    _assert_same(free, engine.generate(requests))
    assert emptied == [(2, 0), (2, 0), (1, 0)]


def test_the_allocation_counter_sees_the_old_per_layer_reallocation():
    cache = RaggedKVCache(3, 4, 2, 8, 16, torch.float32, torch.device("cpu"))
    with AllocationCounter() as counter:
        keep = torch.tensor([0, 2, 3])
        cache.keys = [k.index_select(0, keep) for k in cache.keys]  # what select_rows did
        cache.values = [v.index_select(0, keep) for v in cache.values]
    assert counter.bytes == 3 / 4 * 2 * 3 * 4 * 2 * 16 * 8 * 4
    with AllocationCounter() as counter:
        cache.move_rows([(2, 1)], columns=10)
    assert counter.bytes == 0


def test_compaction_fills_holes_from_the_end_and_moves_nothing_else():
    assert compaction_moves([0, 1, 2]) == ([], [0, 1, 2])
    assert compaction_moves([0, 2, 4]) == ([(4, 1)], [0, 4, 2])
    assert compaction_moves([3, 4]) == ([(3, 0), (4, 1)], [3, 4])
    assert compaction_moves([]) == ([], [])
    cache = RaggedKVCache(2, 5, 1, 2, 6, torch.float32, torch.device("cpu"))
    for layer in cache.keys + cache.values:
        layer.copy_(torch.arange(5.0)[:, None, None, None].expand_as(layer))
    moves, order = compaction_moves([0, 2, 4])
    cache.move_rows(moves)
    assert [int(cache.keys[1][i, 0, 0, 0]) for i in range(3)] == order == [0, 4, 2]


@pytest.mark.parametrize("cache", ["prefix", "none"])
def test_full_attention_engine_under_a_budget_runs_smaller_batches_with_the_same_tokens(tiny_policies, cache):
    policy = tiny_policies["llada"]
    params = {"temperature": 1.0, "remasking": "low_confidence_static", "steps_per_block": 4}
    requests = _requests(policy, (5, 9, 3, 7, 4), (64, 64, 64, 32, 32), params)  # blocks of 32
    free = TorchEngine(policy, kv_cache=cache).generate(requests)
    engine = TorchEngine(policy, kv_cache=cache)
    engine.memory_budget = parse_memory_budget(2 * slot_bytes(engine, requests))
    budgeted = engine.generate(requests)
    _assert_same(free, budgeted)
    m = engine.memory_metrics()
    assert m["rollout/cache_slots"] == 2 and m["rollout/cache_rows_peak"] == 2
    assert m["rollout/cache_allocated_bytes"] <= m["rollout/memory_budget_bytes"]
    assert (m["rollout/cache_allocated_bytes"] > 0) == (cache != "none")


def test_a_budget_too_small_for_one_request_is_one_line_naming_the_field(tiny_model_dirs):
    engine = TorchEngine.from_dir(tiny_model_dirs["block"], kv_cache="block", memory_budget="1KiB")
    request = GenerationRequest(torch.arange(10, 20), SamplingParams(max_tokens=8), seed=0)
    with pytest.raises(ValueError, match=r"^rollout.memory_budget: 1024 bytes = 1.00 KiB holds no request") as err:
        engine.generate([request])
    assert "\n" not in str(err.value)


def test_memory_budget_parsing():
    assert parse_memory_budget(None) is None
    assert parse_memory_budget(0.5).fraction == 0.5
    assert parse_memory_budget("2GiB").bytes == 2 * 2 ** 30
    assert parse_memory_budget("1.5 GB").bytes == 1_500_000_000
    assert parse_memory_budget(4096).bytes == 4096
    assert parse_memory_budget(0.25).resolve(torch.device("cpu")) > 0  # a quarter of MemAvailable
    assert parse_memory_budget("512B").bytes == 512 and parse_memory_budget(2 ** 50).bytes == 2 ** 50
    for bad in (0.0, 1.5, -3, "2 parsecs", "0MiB", True, [1], float("nan"), float("inf"), 1e30, "-1GiB", "1e30",
                "0.0", "0.9", "1.5", "512", 10 ** 30, "99999999999TiB", "0.0001B"):
        with pytest.raises(ValueError, match="^rollout.memory_budget: "):
            parse_memory_budget(bad)


def test_fill_metrics_merge_across_workers():
    a = {"rollout/completed": 2, "rollout/cache_fill_peak": 0.9, "rollout/cache_fill_mean": 0.5,
         "rollout/cache_bytes_peak": 100.0}
    b = {"rollout/completed": 2, "rollout/cache_fill_peak": 0.4, "rollout/cache_fill_mean": 0.3,
         "rollout/cache_bytes_peak": 50.0}
    merged = merge_rollout_metrics([a, b])
    assert merged["rollout/cache_fill_peak"] == 0.9 and merged["rollout/cache_fill_mean"] == pytest.approx(0.4)
    assert merged["rollout/cache_bytes_peak"] == 150.0


# ------------------------------------------------------------------------------------------------ sleep / wake
def test_engine_sleep_frees_the_weights_and_wake_decodes_bitwise_the_same(tiny_model_dirs, tmp_path):
    engine = TorchEngine.from_dir(tiny_model_dirs["block"], kv_cache="block", spill_dir=tmp_path)
    params = SamplingParams(temperature=1.0, max_tokens=12, remasking="low_confidence_dynamic")
    requests = [GenerationRequest(torch.arange(10, 14 + i), params, seed=i) for i in range(3)]
    before = engine.generate(requests)
    state = {k: v.clone() for k, v in engine.policy.causal_lm.state_dict().items()}
    resident = engine.resident_weight_bytes()
    assert resident >= sum(v.numel() * v.element_size() for v in engine.policy.causal_lm.parameters())
    assert engine.sleep() == resident and engine.asleep
    assert engine.resident_weight_bytes() == 0 and engine.sleep() == 0  # measured: nothing left on the device
    engine.wake()
    assert engine.resident_weight_bytes() == resident and not engine.asleep
    assert all(torch.equal(state[k], v) for k, v in engine.policy.causal_lm.state_dict().items())
    after = engine.generate(requests)
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x.response_ids, y.response_ids) and torch.equal(x.logprobs, y.logprobs)
    engine.sleep()
    again = engine.generate(requests)  # generate wakes a sleeping engine
    assert not engine.asleep and all(torch.equal(x.logprobs, y.logprobs) for x, y in zip(before, again))


def test_update_weights_while_asleep_lands_and_survives_the_wake(tiny_model_dirs, tmp_path):
    """sleep -> update_weights (bucket by bucket, as a sync does) -> generate: the new weights are what decodes, not
    the pre-sleep ones restored by the wake over them; an awake engine given the same update decodes the same."""
    path = tiny_model_dirs["block"]
    awake, sleeper = (TorchEngine.from_dir(path, kv_cache="block", spill_dir=tmp_path) for _ in range(2))
    g = torch.Generator().manual_seed(5)
    new = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
           for n, p in awake.policy.causal_lm.named_parameters()}
    params = SamplingParams(temperature=1.0, max_tokens=12, remasking="low_confidence_dynamic")
    requests = [GenerationRequest(torch.arange(10, 14 + i), params, seed=i) for i in range(3)]
    before = sleeper.generate(requests)
    assert sleeper.sleep() > 0 and sleeper.asleep
    items = sorted(new.items())
    for engine in (awake, sleeper):
        engine.update_weights(items[:5], 7, final=False)
        engine.update_weights(items[5:], 7, final=True)
    assert not sleeper.asleep and sleeper.policy_version == awake.policy_version == 7
    for name, p in sleeper.policy.causal_lm.named_parameters():
        assert torch.equal(p.detach(), new[name]), name
    a, b = awake.generate(requests), sleeper.generate(requests)
    assert all(torch.equal(x.response_ids, y.response_ids) and torch.equal(x.logprobs, y.logprobs)
               for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x.logprobs, y.logprobs) for x, y in zip(before, b, strict=True))  # the update did


_RSS_SCRIPT = """
import sys, torch
from rollout.sleep import WeightSleep


def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


module = torch.nn.Linear(4096, 4096, bias=False)
tied = torch.nn.ModuleList([module, torch.nn.Linear(4096, 4096, bias=False)])
tied[1].weight = module.weight  # a tied weight is one storage: freed and restored once, still shared
weight = module.weight.detach().clone()
sleeper = WeightSleep(tied, spill_dir=sys.argv[1])
before = rss()
assert sleeper.sleep() == 4096 * 4096 * 4
dropped = before - rss()
assert dropped > 0.9 * 4096 * 4096 * 4, f"RSS dropped by {dropped / 2**20:.1f} MiB"
sleeper.wake()
assert torch.equal(module.weight, weight) and tied[1].weight is module.weight
assert tied[1].weight.data_ptr() == module.weight.data_ptr()
print("ok")
"""


def test_sleep_returns_host_memory_measured_by_rss(tmp_path):
    """64 MiB of weights (one tensor, so the allocator maps and unmaps it): RSS drops by about that on sleep.
    Measured in a fresh process: after a long test session malloc may serve 64 MiB from a freed heap region,
    which free() keeps mapped, so RSS in a shared process says nothing about what sleep released."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_worker_reports_cache_fill_and_sleeps(tiny_model_dirs):
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(tiny_model_dirs["block"], kv_cache="block", memory_budget="64KiB")
    params = SamplingParams(temperature=1.0, max_tokens=8)
    worker.generate([GenerationRequest(torch.arange(10, 13 + i), params, seed=i) for i in range(4)])
    m = worker.metrics()
    assert m["rollout/memory_budget_bytes"] == 64 * 1024 and m["rollout/cache_rows_peak"] >= 1
    assert 0 < m["rollout/cache_fill_mean"] <= m["rollout/cache_fill_peak"] <= 1
    assert worker.sleep() > 0 and worker.engine.resident_weight_bytes() == 0
    worker.wake()
    assert worker.engine.resident_weight_bytes() > 0


def test_recipe_memory_budget_field():
    from launch.recipe import RolloutSection

    assert RolloutSection(memory_budget="24GiB").memory_budget == "24GiB"
    assert RolloutSection(memory_budget=0.9).memory_budget == 0.9
    for bad, message in ((3, "ambiguous"), (1.5, "fraction must lie in"), ("lots", "not a size")):
        with pytest.raises(ValueError, match=message):
            RolloutSection(memory_budget=bad)
