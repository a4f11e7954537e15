"""Host syncs while decoding (issue 16): at most one per decoding step, for every decoder and remasking policy.

The counter (rollout/decoding/sync_counter.py) sees the calls that would make a GPU wait for its queue (device
values read by Python) and the blocking list -> device copies; on the CPU they are the same calls, so the count
is the GPU's. The first tests check the hook itself: it must see each kind of sync, or the bound below is empty.
Under a memory budget (fewer cache slots than requests) the bound holds per step, steps that admit rows into freed
slots or evict finished rows included: admission and eviction read nothing from the device themselves.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import rollout.decoding.block as block_decoding
from rollout.decoding import sync_counter
from rollout.decoding.sync_counter import count_host_syncs
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.sampling import GenerationRequest, SamplingParams
from tests.rollout.decoding_cases import EOSER, EVERY_REMASKING, ORIGIN, EosBiased, budget_for_slots


def _counted(fn) -> sync_counter.SyncCounts:
    with count_host_syncs() as counts, sync_counter.counting():
        fn()
    return counts


@pytest.mark.parametrize("read", [
    lambda t: t[1].item(), lambda t: t.tolist(), lambda t: bool(t[0]), lambda t: int(t[1]), lambda t: float(t[1]),
    lambda t: [0, 1, 2][t[1]], lambda t: t.nonzero(), lambda t: t[t > 1], lambda t: t.cpu(),
    lambda t: torch.equal(t, t), lambda t: t.numpy(), lambda t: t.masked_select(t > 1),
    lambda t: t.repeat_interleave(t), lambda t: torch.where(t > 1),
])
def test_the_counter_sees_each_kind_of_device_read(read):
    t = torch.tensor([0, 1, 2])
    assert _counted(lambda: read(t)).syncs == 1


def test_the_counter_ignores_device_side_work_and_counts_copies_and_steps():
    t = torch.tensor([0, 1, 2])

    def work():
        torch.nonzero_static(t, size=2)
        (t * 2).sum().to(t.device)
        torch.tensor([1, 2], device=t.device)  # a blocking list -> device copy on an accelerator
        sync_counter.note_step()

    counts = _counted(work)
    assert (counts.syncs, counts.h2d_copies, counts.steps) == (0, 1, 1)
    assert _counted(lambda: t.tolist()).syncs == 1
    with count_host_syncs() as outside:  # armed only inside decode(): nothing counted out here
        t.tolist()
    assert outside.syncs == 0


REMASKING = {**EVERY_REMASKING, "eoser": {**EOSER, "steps_per_block": 2}, "origin": ORIGIN}


@pytest.fixture(scope="module")
def sync_policies(tiny_policies, tiny_model_dirs):
    full = {kind: load_policy(tiny_model_dirs[kind], block_size=8) for kind in ("llada", "dream")}
    # EOS-biased so block rows stop at different blocks (rows leave the batch) and full rows see EOS
    return {"sdar": EosBiased(tiny_policies["sdar"], 1.0), "llada": EosBiased(full["llada"], 1.0),
            "dream": full["dream"]}


def _requests(policy, name: str, g: torch.Generator) -> list[GenerationRequest]:
    """Four rows under remasking policy `name` (prompts drawn from `g`) and, as a second parameter group in the same
    batch (rows are processed per group), one greedy row."""
    params = SamplingParams(temperature=1.0, max_tokens=16, **REMASKING[name])
    requests = [GenerationRequest(torch.randint(10, len(policy.tokenizer), (n,), generator=g), params, seed=i)
                for i, n in enumerate((3, 9, 14, 5))]
    requests.append(GenerationRequest(torch.arange(10, 17), SamplingParams(temperature=0.0, max_tokens=16), 9))
    return requests


@pytest.mark.parametrize("kind,cache", [("sdar", "block"), ("sdar", "none"), ("llada", "none"),
                                        ("llada", "prefix"), ("llada", "dual"), ("dream", "dual")])
def test_at_most_one_host_sync_per_decoding_step(sync_policies, kind, cache):
    policy = sync_policies[kind]
    g = torch.Generator().manual_seed(0)
    names = [n for n in REMASKING if n != "origin" or kind == "dream"]
    for name in names:
        requests = _requests(policy, name, g)
        with count_host_syncs() as counts:
            out = TorchEngine(policy, kv_cache=cache).generate(requests)
        assert counts.steps >= max(t.nfe for t in out) > 0
        assert counts.syncs <= counts.steps, (name, counts)
        # per step: the view's one host buffer; block decoding adds one index copy when rows leave the batch
        assert counts.h2d_copies + counts.async_h2d_copies <= counts.steps + len(requests), (name, counts)


@pytest.mark.parametrize("kind,cache", [("sdar", "block"), ("sdar", "none"), ("llada", "prefix"), ("llada", "dual"),
                                        ("dream", "dual")])
def test_decoding_creates_no_tensor_without_naming_its_device(sync_policies, monkeypatch, kind, cache):
    """On a GPU a tensor made without a device (torch.arange(n), torch.tensor(list)) lands on the host, and using
    it next to device tensors is an error or a blocking copy the counter above cannot see on a CPU run (host and
    device are one there). Decoding under a `meta` default device turns every such tensor into one that cannot
    meet the CPU tensors of this run: the decoders must name a device for each tensor they make (host buffers by
    intent name the CPU)."""
    from contextlib import contextmanager

    @contextmanager
    def meta_by_default():
        with torch.device("meta"):
            yield

    policy = sync_policies[kind]
    names = [n for n in REMASKING if n != "origin" or kind == "dream"]
    lengths = (3, 9, 5, 7, 4, 6, 8, 2, 10)  # one request per remasking policy, in one batch
    requests = [GenerationRequest(torch.arange(10, 10 + n), SamplingParams(temperature=1.0, max_tokens=16,
                                                                           **REMASKING[name]), seed=i)
                for i, (n, name) in enumerate(zip(lengths[:len(names)], names, strict=True))]
    plain = TorchEngine(policy, kv_cache=cache).generate(requests)
    monkeypatch.setattr(sync_counter, "counting", meta_by_default)
    strict = TorchEngine(policy, kv_cache=cache).generate(requests)
    assert all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(plain, strict, strict=True))


def test_host_columns_carry_ints_and_float32_values_exactly_in_one_copy():
    from rollout.decoding.state import host_columns

    floats = [0.1, -2.5e-8, 1.0 / 3.0, float("inf"), 0.0]
    with count_host_syncs() as counts, sync_counter.counting():
        cols = host_columns(torch.device("cpu"), {"a": [1, -7, 2**40, 0, 3], "b": [0, 1, 2, 3, 4]},
                            {"g": floats, "p": [1.0] * 5})
    assert (counts.syncs, counts.h2d_copies, counts.async_h2d_copies) == (0, 0, 1)
    assert cols["a"].tolist() == [1, -7, 2**40, 0, 3] and cols["b"].dtype == torch.long
    assert cols["g"].dtype == torch.float32
    assert torch.equal(cols["g"], torch.tensor(floats, dtype=torch.float32))  # bitwise: same rounding as before


@pytest.mark.parametrize("kind,cache", [("sdar", "block"), ("llada", "prefix")])
def test_at_most_one_host_sync_per_step_under_a_memory_budget(sync_policies, monkeypatch, kind, cache):
    """2 cache slots for 5 requests. Cached block decoding admits waiting rows into the slots of finished rows (a
    prefill forward of their own) and evicts finished rows in place; each step, those included, makes <= 1 sync
    (counted step by step, not on average), and admission/eviction make none themselves. Full attention runs
    batches of 2 under the same bound."""
    policy = sync_policies[kind]
    per_step, inside = [], {"admit": [], "evict": []}  # syncs of each step; syncs made inside admit/evict

    def note_step():
        if sync_counter._ACTIVE:
            counts = sync_counter._ACTIVE[-1]
            per_step.append(counts.syncs)
            counts.steps += 1

    def watched(name, fn):
        def wrapper(*args, **kwargs):
            if not sync_counter._ACTIVE:  # the unbudgeted reference run
                return fn(*args, **kwargs)
            counts = sync_counter._ACTIVE[-1]
            before = counts.syncs
            out = fn(*args, **kwargs)
            inside[name].append((counts.syncs - before, args))
            return out
        return wrapper

    monkeypatch.setattr(sync_counter, "note_step", note_step)
    monkeypatch.setattr(block_decoding, "_admit", watched("admit", block_decoding._admit))
    monkeypatch.setattr(block_decoding, "_evict", watched("evict", block_decoding._evict))
    g = torch.Generator().manual_seed(0)
    names = [n for n in REMASKING if n != "origin" or kind == "dream"]
    for name in names:
        requests = _requests(policy, name, g)
        # same tokens as one batch (full attention: see test_decoding_pinned, entropy-ranked cases excepted)
        free = TorchEngine(policy, kv_cache=cache).generate(requests) if cache == "block" else None
        engine = TorchEngine(policy, kv_cache=cache)
        engine.memory_budget = budget_for_slots(engine, requests, 2)
        per_step.clear()
        with count_host_syncs() as counts:
            out = engine.generate(requests)
        assert engine.memory_metrics()["rollout/cache_slots"] == 2
        if free is not None:
            assert [t.response_ids.tolist() for t in out] == [t.response_ids.tolist() for t in free], name
        assert counts.steps == len(per_step) >= max(t.nfe for t in out) > 0
        # syncs of step k: from its forward to the next one (its read_step, then eviction and the next admission)
        marks = per_step + [counts.syncs]
        step_syncs = [b - a for a, b in itertools.pairwise(marks)]
        assert max(step_syncs) <= 1 and marks[0] == 0, (name, step_syncs)
        assert counts.h2d_copies + counts.async_h2d_copies <= counts.steps + len(requests), (name, counts)
    if cache == "block":
        assert all(n == 0 for n, _ in inside["admit"] + inside["evict"]), inside
        late_admissions = sum(1 for _, args in inside["admit"] if args[-1] > 0)  # lo > 0: slots being reused
        evictions = sum(1 for _, args in inside["evict"] if any(r.finish_reason for r in args[0]))
        assert late_admissions >= len(names) and evictions >= len(names), (late_admissions, evictions)
