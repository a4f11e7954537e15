"""Block-diffusion decoding: cached == uncached, step maps, batch invariance, recomputable log-probs."""
from __future__ import annotations

import pytest
import torch

from rollout.engine import TorchEngine
from rollout.models.policy import DiffusionPolicy
from rollout.sampling import GenerationRequest, SamplingParams, processed_logprobs

LENGTHS = (3, 9, 14, 5)



class Biased(DiffusionPolicy):
    """A tiny policy whose logits are scaled (confidence) and pushed towards EOS, and which logs batch sizes."""

    def __init__(self, base: DiffusionPolicy, scale: float = 1.0, eos_bonus: float = 0.0):
        super().__init__(base.model, base.tokenizer, base.spec, base.source)
        self.scale, self.eos_bonus, self.batch_sizes = scale, eos_bonus, []

    def logits_from_hidden(self, hidden):
        logits = super().logits_from_hidden(hidden) * self.scale
        logits[..., self.spec.eos_token_id] += self.eos_bonus
        return logits

    def forward(self, input_ids, *args, **kwargs):
        self.batch_sizes.append(input_ids.shape[0])
        return super().forward(input_ids, *args, **kwargs)


def _prompts(policy, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, len(policy.tokenizer), (n,), generator=g) for n in lengths]


def _generate(policy, prompts, params, kv_cache="block", seeds=None):
    seeds = seeds or list(range(len(prompts)))
    requests = [GenerationRequest(p, params, seed=s, request_id=str(i)) for i, (p, s) in
                enumerate(zip(prompts, seeds))]
    out = TorchEngine(policy, kv_cache=kv_cache).generate(requests)
    for t in out:
        t.validate()
    return out


def _assert_same(a, b, logprob_atol=1e-5):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.finish_reason == y.finish_reason
        assert torch.equal(x.response_ids, y.response_ids)
        assert torch.equal(x.step_map, y.step_map)
        assert x.nfe == y.nfe
        assert torch.allclose(x.logprobs, y.logprobs, atol=logprob_atol)


@pytest.mark.parametrize("kind", ["block", "sdar"])
@pytest.mark.parametrize("remasking,extra", [
    ("low_confidence_static", {"steps_per_block": 2}), ("low_confidence_dynamic", {}), ("sequential", {}),
])
def test_greedy_cached_equals_uncached(tiny_policies, kind, remasking, extra):
    policy = tiny_policies[kind]
    params = SamplingParams(temperature=0, max_tokens=24, remasking=remasking, stop_at_eos=False, **extra)
    prompts = _prompts(policy)
    _assert_same(_generate(policy, prompts, params), _generate(policy, prompts, params, kv_cache="none"))


def test_sampled_cached_equals_uncached_when_rows_stop_at_different_blocks(tiny_policies):
    policy = Biased(tiny_policies["block"], eos_bonus=1.0)
    params = SamplingParams(temperature=1.0, max_tokens=32, remasking="low_confidence_dynamic")
    prompts = _prompts(policy, (3, 9, 14, 5, 7, 2))
    cached = _generate(policy, prompts, params)
    sizes = list(policy.batch_sizes)
    _assert_same(cached, _generate(policy, prompts, params, kv_cache="none"))
    lengths = [t.response_length for t in cached]
    assert len(set(lengths)) > 1, "the EOS bias should stop rows at different blocks"
    for t in cached:
        eos = (t.response_ids == policy.spec.eos_token_id).nonzero()
        if t.finish_reason == "eos":  # stops with the block holding the first EOS
            assert int(eos[0]) // 4 == t.response_length // 4 - 1 and t.valid_length == int(eos[0]) + 1
        else:
            assert t.response_length == 32 and not eos.numel()
    # Finished rows leave the batch: forwards shrink, down to the single longest row.
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == len(prompts) and sizes[-1] < len(prompts)


def test_rows_at_different_blocks_share_forwards_exactly(tiny_policies):
    """Dynamic remasking on a confident model desynchronises rows: the ragged cache path must stay exact."""
    policy = Biased(tiny_policies["block"], scale=30.0, eos_bonus=-5.0)
    params = SamplingParams(temperature=1.0, max_tokens=24, remasking="low_confidence_dynamic", threshold=0.7)
    prompts = _prompts(policy, (3, 9, 14, 5, 7, 2))
    cached = _generate(policy, prompts, params)
    assert len({t.nfe for t in cached}) > 1, "rows should need different numbers of steps"
    _assert_same(cached, _generate(policy, prompts, params, kv_cache="none"), logprob_atol=1e-4)


@pytest.mark.parametrize("steps,k", [(4, 1), (2, 2), (1, 4)])
def test_static_unmasks_exactly_k_per_step(tiny_policies, steps, k):
    policy = tiny_policies["block"]
    params = SamplingParams(temperature=1.0, max_tokens=16, remasking="low_confidence_static",
                            steps_per_block=steps, stop_at_eos=False)
    for t in _generate(policy, _prompts(policy), params):
        assert torch.all(torch.bincount(t.step_map) == k)
        assert t.nfe == t.num_steps == 16 // k


def test_step_map_covers_every_token_once_and_blocks_are_ordered(tiny_policies):
    policy = Biased(tiny_policies["block"], scale=30.0)  # confident: several tokens per step
    params = SamplingParams(temperature=1.0, max_tokens=24, remasking="low_confidence_dynamic", threshold=0.6,
                            min_tokens_per_step=2, stop_at_eos=False)
    many = 0
    for t in _generate(policy, _prompts(policy), params):
        counts = torch.bincount(t.step_map)
        assert torch.all(counts >= 1) and int(counts.sum()) == t.response_length == 24
        assert t.nfe == t.num_steps  # one forward per step: prefill and commits are fused into steps
        blocks = t.step_map.view(-1, 4)
        assert torch.all(blocks.max(dim=1).values[:-1] < blocks.min(dim=1).values[1:])
        for block in blocks:  # the floor holds except for a block's last leftover token
            per_step = torch.bincount(block - block.min())
            per_step = per_step[per_step > 0]
            assert torch.all(per_step[:-1] >= 2) and per_step[-1] >= 1
        many += int((counts > 2).sum())
    assert many > 0, "a confident model should unmask more than the floor in some steps"


@pytest.mark.parametrize("temperature,remasking", [(0, "low_confidence_static"), (1.0, "low_confidence_dynamic"),
                                                   (0.8, "random")])
def test_a_prompt_decodes_the_same_alone_and_inside_a_padded_batch(tiny_policies, temperature, remasking):
    policy = Biased(tiny_policies["sdar"], eos_bonus=1.5)
    params = SamplingParams(temperature=temperature, top_k=20, max_tokens=20, remasking=remasking)
    prompts = _prompts(policy, (6, 15, 2, 11, 6))
    batch = _generate(policy, prompts, params, seeds=[11, 12, 13, 14, 15])
    for i, prompt in enumerate(prompts):
        alone = _generate(policy, [prompt], params, seeds=[11 + i])
        _assert_same(alone, [batch[i]])


def _recompute(policy, traj, params):
    """Log-prob of every token under the processed distribution at the state before its step (own forward)."""
    steps = list(range(traj.num_steps))
    states = [traj.state_before_step(s, policy.spec.mask_token_id) for s in steps]
    packed = policy.pack([traj.prompt_ids] * len(steps), [traj.response_ids] * len(steps), states)
    with torch.no_grad():
        out = policy.forward(packed.input_ids, packed.position_ids, packed.attn_bias, logits_at=packed.target_pos)
    got = torch.zeros_like(traj.logprobs)
    for s in steps:
        where = (traj.step_map == s).nonzero().squeeze(-1)
        logp = processed_logprobs(out.logits[s, where], params)
        got[where] = logp.gather(-1, traj.response_ids[where, None]).squeeze(-1)
    return got


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, max_tokens=16, remasking="low_confidence_dynamic"),
    SamplingParams(temperature=1.0, top_k=12, top_p=0.9, max_tokens=16, remasking="low_confidence_static",
                   steps_per_block=2),
    SamplingParams(temperature=0, max_tokens=16, remasking="sequential"),
])
def test_rollout_logprobs_are_recomputed_from_the_pre_step_states(tiny_policies, params):
    policy = tiny_policies["block"]
    for traj in _generate(policy, _prompts(policy), params):
        assert torch.allclose(_recompute(policy, traj, params), traj.logprobs, atol=1e-4)


def test_the_learner_scoring_api_reproduces_rollout_logprobs(tiny_policies):
    policy = tiny_policies["sdar"]
    params = SamplingParams(temperature=0.9, max_tokens=12, remasking="low_confidence_dynamic")
    for traj in _generate(policy, _prompts(policy), params):
        steps = range(traj.num_steps)
        scores = policy.score_responses(
            [traj.prompt_ids] * len(steps), [traj.response_ids] * len(steps),
            [traj.state_before_step(s, policy.spec.mask_token_id) for s in steps],
            score_mask=[traj.step_map == s for s in steps], temperature=0.9,
        )
        recomputed = (scores.logprobs * scores.valid).sum(dim=0)
        assert torch.allclose(recomputed, traj.logprobs, atol=1e-4)
