"""Sampling: processed distributions, per-request generators, parameter validation."""
from __future__ import annotations

import math

import pytest
import torch

from rollout.sampling import GenerationRequest, SamplingParams, entropy, processed_logprobs, sample_tokens


def _logits(n=3, vocab=12, seed=0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_temperature_top_k_top_p_match_a_naive_filter():
    logits = _logits()
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.8)
    got = processed_logprobs(logits, params)
    assert len(logits) == len(got) > 0
    for row, logp in zip(logits, got):
        scaled = row / 0.7
        keep = torch.zeros_like(row, dtype=torch.bool)
        keep[torch.topk(scaled, 6).indices] = True
        probs = torch.where(keep, scaled, torch.tensor(float("-inf"))).softmax(-1)
        order = torch.argsort(probs, descending=True)
        total, kept = 0.0, torch.zeros_like(keep)
        for idx in order.tolist():  # keep tokens until the mass ranked above reaches top_p
            if total >= 0.8:
                break
            kept[idx] = True
            total += float(probs[idx])
        expected = torch.where(kept, scaled, torch.tensor(float("-inf"))).log_softmax(-1)
        assert torch.equal(torch.isfinite(logp), kept)
        assert torch.allclose(logp[kept], expected[kept], atol=1e-5)


def test_greedy_takes_the_argmax_and_records_the_untempered_logprob():
    logits = _logits()
    tokens, logp = sample_tokens(processed_logprobs(logits, SamplingParams(temperature=0)),
                                 SamplingParams(temperature=0), None)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logp, logits.log_softmax(-1).max(-1).values)


def test_sampling_follows_the_distribution_and_never_picks_filtered_tokens():
    params = SamplingParams(temperature=1.0, top_k=4)
    logp = processed_logprobs(_logits(n=1, vocab=10, seed=3).expand(20000, -1), params)
    tokens, _ = sample_tokens(logp, params, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=10).float() / tokens.numel()
    probs = logp[0].exp()
    assert torch.all(counts[probs == 0] == 0)
    assert torch.allclose(counts, probs, atol=0.015)


def test_a_generator_makes_sampling_reproducible_and_consumes_one_uniform_per_row():
    params = SamplingParams(temperature=1.0)
    logp = processed_logprobs(_logits(n=5, vocab=50), params)
    a = sample_tokens(logp, params, torch.Generator().manual_seed(7))[0]
    b = sample_tokens(logp, params, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    sample_tokens(logp, params, g)
    reference = torch.Generator().manual_seed(7)
    torch.rand(5, 1, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_entropy_ignores_filtered_tokens():
    logp = processed_logprobs(torch.tensor([[0.0, 0, 0, 0, -1, -2, -3, -4]]), SamplingParams(top_k=4))
    assert math.isclose(float(entropy(logp)), math.log(4), rel_tol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("max_tokens", 0), ("remasking", "nope"),
    ("steps_per_block", 0), ("schedule", "cosine"), ("eoser_gamma_min", 1.5), ("min_tokens_per_step", 0),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingParams(**{field: value})


def test_request_takes_lists_and_dicts():
    request = GenerationRequest([1, 2, 3], {"temperature": 0.5, "max_tokens": 8}, seed=3)
    assert request.prompt_ids.dtype == torch.long and request.sampling.temperature == 0.5
    with pytest.raises(ValueError, match="sampling.tempreature"):
        GenerationRequest([1], {"tempreature": 0.5})
