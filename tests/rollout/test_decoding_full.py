"""Full-attention decoding (LLaDA, Dream): exact no-cache reference, Fast-dLLM caches, ASS, EOSER."""
from __future__ import annotations

import pytest
import torch

from rollout.decoding.schedules import eoser_gamma
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.sampling import GenerationRequest, SamplingParams
from tests.rollout.decoding_cases import EosBiased

BLOCK = 8



@pytest.fixture(scope="module")
def full_policies(tiny_model_dirs):
    return {kind: load_policy(tiny_model_dirs[kind], block_size=BLOCK) for kind in ("llada", "dream")}


def _prompts(policy, lengths=(3, 9, 14, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, len(policy.tokenizer), (n,), generator=g) for n in lengths]


def _generate(policy, prompts, params, kv_cache="none", seeds=None):
    seeds = seeds or list(range(len(prompts)))
    requests = [GenerationRequest(p, params, seed=s) for p, s in zip(prompts, seeds)]
    out = TorchEngine(policy, kv_cache=kv_cache).generate(requests)
    for t in out:
        t.validate()
        assert t.response_length == params.max_tokens and t.finish_reason in ("eos", "length")
    return out


def _same(a, b):
    assert len(a) == len(b) > 0
    return all(torch.equal(x.response_ids, y.response_ids) and torch.equal(x.step_map, y.step_map)
               for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_caches_are_exact_when_each_block_takes_one_step(full_policies, kind, mode):
    policy = full_policies[kind]
    params = SamplingParams(temperature=0, max_tokens=24, remasking="low_confidence_static", steps_per_block=1)
    prompts = _prompts(policy)
    reference = _generate(policy, prompts, params)
    cached = _generate(policy, prompts, params, kv_cache=mode)
    assert _same(reference, cached)
    assert len(reference) == len(cached) > 0
    for x, y in zip(reference, cached):
        assert torch.allclose(x.logprobs, y.logprobs, atol=1e-5)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_caches_agree_on_the_first_step_and_approximate_the_rest(full_policies, kind):
    policy = full_policies[kind]
    params = SamplingParams(temperature=0, max_tokens=24, remasking="low_confidence_static", steps_per_block=4)
    prompts = _prompts(policy)
    reference = _generate(policy, prompts, params)
    for mode in ("prefix", "dual"):
        cached = _generate(policy, prompts, params, kv_cache=mode)
        assert len(reference) == len(cached) > 0
        for x, y in zip(reference, cached):
            first = x.step_map == 0  # the first step of the first block is a full forward in every mode
            assert torch.equal(first, y.step_map == 0)
            assert torch.equal(x.response_ids[first], y.response_ids[first])
            # Each family's own step schedule: LLaDA's even split, Dream's 1 - s/t counts (8 over 4 steps).
            per_block = [2, 2, 2, 2] if kind == "llada" else [1, 2, 2, 3]
            assert torch.bincount(y.step_map).tolist() == per_block * 3
        agree = sum(int((x.response_ids == y.response_ids).sum()) for x, y in zip(reference, cached))
        print(f"{kind} {mode}: {agree}/{24 * len(prompts)} tokens agree with the exact decoder (random weights)")


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_rollout_logprobs_are_recomputed_by_the_learner_api(full_policies, kind):
    policy = full_policies[kind]
    params = SamplingParams(temperature=0.8, max_tokens=16, remasking="low_confidence_dynamic")
    for traj in _generate(policy, _prompts(policy), params):
        assert traj.nfe == traj.num_steps
        steps = range(traj.num_steps)
        scores = policy.score_responses(
            [traj.prompt_ids] * len(steps), [traj.response_ids] * len(steps),
            [traj.state_before_step(s, policy.spec.mask_token_id) for s in steps],
            score_mask=[traj.step_map == s for s in steps], temperature=0.8,
        )
        assert torch.allclose((scores.logprobs * scores.valid).sum(0), traj.logprobs, atol=1e-4)


@pytest.mark.parametrize("mode,remasking", [("none", "random"), ("dual", "low_confidence_dynamic"),
                                            ("prefix", "low_confidence_static")])
def test_a_prompt_decodes_the_same_alone_and_in_a_padded_batch(full_policies, mode, remasking):
    policy = full_policies["dream"]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, remasking=remasking, steps_per_block=None)
    prompts = _prompts(policy, (6, 15, 2, 11))
    batch = _generate(policy, prompts, params, kv_cache=mode, seeds=[5, 6, 7, 8])
    for i, prompt in enumerate(prompts):
        alone = _generate(policy, [prompt], params, kv_cache=mode, seeds=[5 + i])
        assert _same(alone, [batch[i]])
        assert torch.allclose(alone[0].logprobs, batch[i].logprobs, atol=1e-5)


def test_ass_steps_and_eoser_confidence(full_policies):
    policy = EosBiased(full_policies["llada"], bonus=2.0)
    params = SamplingParams(temperature=1.0, max_tokens=16, remasking="low_confidence_static", schedule="ass",
                            eoser_gamma_min=0.01)
    eos = policy.spec.eos_token_id
    seen_eos = 0
    for traj in _generate(policy, _prompts(policy), params):
        # ASS over a block of 8: steps unmask 1, 2, 5 tokens.
        assert torch.bincount(traj.step_map).tolist() == [1, 2, 5] * 2
        local = traj.block_local_steps()
        gamma = torch.tensor([eoser_gamma(int(s), 3, 0.01, ass=True) for s in local])
        scale = torch.where(traj.response_ids == eos, gamma, torch.ones_like(gamma))
        assert torch.allclose(traj.confidence, traj.logprobs.exp() * scale, atol=1e-6)
        seen_eos += int((traj.response_ids == eos).sum())
    assert seen_eos > 0


def test_eoser_delays_eos(full_policies):
    policy = EosBiased(full_policies["llada"], bonus=1.5)
    prompts = _prompts(policy, (4,) * 8, seed=3)

    def mean_eos_step(gamma_min):
        params = SamplingParams(temperature=1.0, max_tokens=8, remasking="low_confidence_static",
                                eoser_gamma_min=gamma_min)
        steps = [t.step_map[t.response_ids == policy.spec.eos_token_id].float() for t in
                 _generate(policy, prompts, params)]
        return torch.cat(steps).mean()

    assert mean_eos_step(0.05) > mean_eos_step(None)


def test_remote_code_models_decode_without_a_cache(tmp_path):
    from rollout.models.tiny_remote import make_tiny_remote_code_policy

    policy = load_policy(make_tiny_remote_code_policy("dream", tmp_path / "dream"), trust_remote_code=True,
                         block_size=BLOCK)
    with pytest.raises(ValueError, match="kv_cache"):
        TorchEngine(policy, kv_cache="dual")
    params = SamplingParams(temperature=0.9, max_tokens=16)
    for traj in _generate(policy, _prompts(policy, (5, 5)), params):
        steps = range(traj.num_steps)
        scores = policy.score_responses(
            [traj.prompt_ids] * len(steps), [traj.response_ids] * len(steps),
            [traj.state_before_step(s, policy.spec.mask_token_id) for s in steps],
            score_mask=[traj.step_map == s for s in steps], temperature=0.9,
        )
        assert torch.allclose((scores.logprobs * scores.valid).sum(0), traj.logprobs, atol=1e-4)
