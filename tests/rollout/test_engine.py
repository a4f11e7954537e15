"""TorchEngine: per-request errors, chunking, seeds, bucketed weight updates with strict names, registry."""
from __future__ import annotations

import pytest
import torch

from rollout.engine import TorchEngine, iter_buckets, make_engine
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams

PARAMS = SamplingParams(temperature=1.0, max_tokens=8)



@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """State dict of a second block model with different random weights."""
    path = make_tiny_policy("block", tmp_path_factory.mktemp("other") / "m", seed=7)
    return load_policy(path).causal_lm.state_dict()


@pytest.fixture()
def engine(tiny_model_dirs):
    return TorchEngine.from_dir(tiny_model_dirs["block"])  # a private copy: tests here change its weights


def _requests(n=4, params=PARAMS):
    return [GenerationRequest(torch.arange(10, 13 + i), params, seed=i, request_id=f"r{i}") for i in range(n)]


def test_bad_requests_fail_alone_with_one_line_each(engine):
    mask = engine.policy.spec.mask_token_id
    bad = [
        (GenerationRequest([], PARAMS), "empty prompt"),
        (GenerationRequest(torch.full((1020,), 11), PARAMS), "max_position_embeddings 1024"),
        (GenerationRequest([11, 12], SamplingParams(max_tokens=6)), "not a multiple of the block size 4"),
        (GenerationRequest([11, mask, 12], PARAMS), "contains the mask token"),
        (GenerationRequest([11, 10 ** 6], PARAMS), "token ids must lie in"),
        (GenerationRequest(torch.ones(2, 2, dtype=torch.long), PARAMS), "1-D"),
    ]
    good = _requests(2)
    out = engine.generate([good[0]] + [r for r, _ in bad] + [good[1]])
    assert [t.request_id for t in (out[0], out[-1])] == ["r0", "r1"]
    assert all(t.finish_reason in ("eos", "length") and t.response_length > 0 for t in (out[0], out[-1]))
    assert len(out[1:-1]) == len(bad) > 0
    for traj, (_, message) in zip(out[1:-1], bad):
        assert traj.finish_reason.startswith("error: ") and message in traj.finish_reason
        assert "\n" not in traj.finish_reason and traj.response_length == 0 and traj.nfe == 0
        traj.validate()


def test_chunking_and_sorting_do_not_change_results(engine):
    requests = _requests(5)
    whole = engine.generate(requests)
    engine.max_batch_size = 2
    chunked = engine.generate(requests)
    assert len(whole) == len(chunked) > 0
    for a, b in zip(whole, chunked):
        assert a.request_id == b.request_id and torch.equal(a.response_ids, b.response_ids)


def test_a_missing_seed_is_drawn_and_recorded(engine):
    first = engine.generate([GenerationRequest([11, 12, 13], PARAMS)])[0]
    seed = first.sampling["seed"]
    again = engine.generate([GenerationRequest([11, 12, 13], PARAMS, seed=seed)])[0]
    assert isinstance(seed, int) and torch.equal(first.response_ids, again.response_ids)
    assert first.sampling["temperature"] == 1.0 and first.sampling["decoder"] == "block"


def test_update_weights_in_buckets_changes_outputs_and_records_the_version(engine, tiny_model_dirs,
                                                                           other_weights, tmp_path):
    requests = _requests(3)
    before = engine.generate(requests)
    engine.bucket_bytes = 64 * 1024  # several buckets for this tiny model
    assert len(list(iter_buckets(other_weights, engine.bucket_bytes))) > 2
    engine.update_weights(iter(other_weights.items()), version=5)
    after = engine.generate(requests)
    assert all(t.policy_version == 5 for t in after)
    assert any(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(before, after))
    # Same tokens as an engine built directly on the new weights.
    fresh = TorchEngine.from_dir(tiny_model_dirs["block"])
    fresh.policy.causal_lm.load_state_dict(other_weights)
    again = fresh.generate(requests)
    assert len(after) == len(again) > 0
    for a, b in zip(after, again):
        assert torch.equal(a.response_ids, b.response_ids)


def test_streamed_update_sets_the_version_on_the_final_call(engine, other_weights):
    names = list(other_weights)
    engine.update_weights({n: other_weights[n] for n in names[:5]}, version=2, final=False)
    assert engine.policy_version == 0
    engine.update_weights([{n: other_weights[n]} for n in names[5:]], version=2, final=True)
    assert engine.policy_version == 2


def test_update_weights_checks_names_shapes_and_completeness(engine, other_weights):
    with pytest.raises(ValueError, match="unknown parameter 'model.nope'"):
        engine.update_weights({"model.nope": torch.zeros(1)}, version=1)
    name = next(iter(other_weights))
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights({name: torch.zeros(3)}, version=1)
    with pytest.raises(ValueError, match="never arrived"):
        engine.update_weights({name: other_weights[name]}, version=1)
    assert engine.policy_version == 0


def test_release_keeps_the_engine_usable(engine):
    engine.release()
    assert engine.generate(_requests(1))[0].response_length > 0


def test_progress_bar(engine, capsys):
    engine.progress = True
    engine.generate(_requests(2))
    assert "rollout" in capsys.readouterr().err


def test_engine_registry(tiny_model_dirs):
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):  # a documented seam, not a stub
        make_engine("sglang", tiny_model_dirs["block"])
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("tgi", tiny_model_dirs["block"])
    with pytest.raises(ValueError, match="kv_cache"):
        make_engine("torch", tiny_model_dirs["block"], kv_cache="dual")
    assert isinstance(make_engine("torch", tiny_model_dirs["llada"], kv_cache="prefix"), TorchEngine)

