"""MDPO's running-confidence remasking (RCR) and the per-step records (Trajectory.step_states / step_predictions /
step_confidence): the engine against a naive re-implementation of the reference's diffusion_generate with rcr=True
(autonomousvision/mdpo src/mdlm_generation_utils.py), one request and one step at a time; and, for a policy that
never remasks, the recorded states against the replay of the step map."""
from __future__ import annotations

import pytest
import torch

from rollout.decoding.schedules import block_schedule
from rollout.engine import TorchEngine
from rollout.models.masks import sequence_bias
from rollout.remasking import make_remasking
from rollout.sampling import GenerationRequest, SamplingParams, processed_logprobs, sample_tokens


def naive_rcr(policy, prompt: torch.Tensor, params: SamplingParams, seed: int):
    """The reference's loop for one request, its remasking confined to the current block as diffrl's RCR is:
    each step samples every masked position of the block (one uniform each, in position order, from the request's
    generator), fills them all, records their confidence as running confidence, then (except at the block's last
    step) masks again the positions still due later, lowest running confidence first."""
    spec = policy.spec
    bs, length, mask_id = spec.block_size, params.max_tokens, spec.mask_token_id
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((length,), mask_id, dtype=torch.long)
    masked = torch.ones(length, dtype=torch.bool)  # not `x == mask_id`: a random model may sample the mask id
    running = torch.zeros(length)
    step_map = torch.full((length,), -1, dtype=torch.long)
    logprobs = torch.zeros(length)
    states, predictions, confidence = [], [], []
    step = 0
    for block in range(length // bs):
        lo, hi = block * bs, (block + 1) * bs
        counts = block_schedule(params, bs, spec.step_schedule)
        for i in range(len(counts)):
            states.append(x.clone())
            seq = torch.cat([prompt, x])
            bias = sequence_bias(prompt.numel(), length, bs, full=True)
            with torch.no_grad():
                logits = policy.forward(seq[None], torch.arange(seq.numel())[None], bias).logits[0]
            cols = lo + torch.nonzero(masked[lo:hi]).squeeze(-1)
            logp_all = processed_logprobs(logits[prompt.numel() + cols], params)
            tokens, logp = sample_tokens(logp_all, params, uniforms=torch.rand(cols.numel(), 1, generator=gen))
            conf = logp.exp()
            pred = x.clone()
            pred[cols] = tokens
            predictions.append(pred)
            c = torch.zeros(length)
            c[cols] = conf
            confidence.append(c)
            x[cols], running[cols], step_map[cols], logprobs[cols] = tokens, conf, step, logp
            masked[cols] = False
            if i != len(counts) - 1:
                due = sum(counts[i + 1:])
                # lowest running confidence first (ties: the later column), as a stable top-k keeps the earlier
                order = sorted(range(lo, hi), key=lambda j: (float(running[j]), -j))[:due]
                x[order] = mask_id
                masked[order] = True
                step_map[order] = -1
            step += 1
    return x, step_map, logprobs, torch.stack(states), torch.stack(predictions), torch.stack(confidence)


@pytest.mark.parametrize("max_tokens,steps", [(32, 8), (64, 4)])
def test_rcr_decodes_as_the_naive_reference_and_records_every_step(tiny_policies, max_tokens, steps):
    policy = tiny_policies["llada"]
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, remasking="rcr", steps_per_block=steps,
                            stop_at_eos=False, record_steps=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(policy.tokenizer), (n,), generator=g) for n in (5, 9, 3)]
    requests = [GenerationRequest(p, params, seed=11 + k, request_id=str(k)) for k, p in enumerate(prompts)]
    out = TorchEngine(policy, kv_cache="none").generate(requests)
    revised = 0
    for k, (traj, prompt) in enumerate(zip(out, prompts)):
        traj.validate()
        x, step_map, logprobs, states, predictions, confidence = naive_rcr(policy, prompt, params, 11 + k)
        assert traj.response_ids.tolist() == x.tolist()
        assert traj.step_map.tolist() == step_map.tolist()
        assert torch.allclose(traj.logprobs, logprobs, atol=1e-5)
        assert traj.step_states.tolist() == states.tolist()
        assert traj.step_predictions.tolist() == predictions.tolist()
        assert torch.allclose(traj.step_confidence, confidence, atol=1e-5)
        # tokens that were decoded, masked again and decoded anew: the step map alone cannot replay these states
        for s in range(1, states.shape[0]):
            was = states[s - 1] != policy.spec.mask_token_id
            revised += int((was & (states[s] == policy.spec.mask_token_id)).sum())
    assert revised > 0  # RCR did revise some tokens here, so the comparison covers remasking


def test_rcr_keep_batch_keeps_the_cumulative_count_and_never_the_prompt_tail():
    policy = make_remasking(SamplingParams(remasking="rcr"))
    key = torch.tensor([[float("-inf"), 0.9, 0.1, 0.5, float("-inf")]])
    running = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3]])  # column 4: decoded before, running confidence 0.3
    masked = torch.tensor([[False, True, True, True, False]])
    fixed = torch.tensor([[True, False, False, False, False]])  # column 0: prompt tail
    keep = policy.keep_batch(key, running, masked, fixed, torch.tensor([1]))
    # decoded before: columns 0 and 4, plus 1 this step -> 3 kept: the prompt tail, 0.9, 0.5; 0.3 is masked again
    assert keep.tolist() == [[True, True, False, True, False]]


@pytest.mark.parametrize("kind,remasking,cache", [("block", "low_confidence_static", "block"),
                                                   ("llada", "low_confidence_dynamic", "none")])
def test_recorded_states_equal_the_step_map_replay_without_remasking(tiny_policies, kind, remasking, cache):
    policy = tiny_policies[kind]
    params = SamplingParams(temperature=1.0, max_tokens=2 * policy.spec.block_size, remasking=remasking,
                            steps_per_block=2 if remasking == "low_confidence_static" else None, threshold=0.05,
                            stop_at_eos=False, record_steps=True)
    requests = [GenerationRequest(torch.tensor([12, 13, 14, 15, 16][: 3 + k]), params, seed=k, request_id=str(k))
                for k in range(2)]
    for traj in TorchEngine(policy, kv_cache=cache).generate(requests):
        mask_id = policy.spec.mask_token_id
        assert traj.step_states.shape == (traj.num_steps, traj.response_length)
        for s in range(traj.num_steps):
            assert traj.step_states[s].tolist() == traj.state_before_step(s, mask_id).tolist()
            decoded_now = traj.step_map == s
            # the step's prediction holds the token it kept, with the probability it was sampled with
            assert traj.step_predictions[s][decoded_now].tolist() == traj.response_ids[decoded_now].tolist()
            assert torch.allclose(traj.step_confidence[s][decoded_now].log(), traj.logprobs[decoded_now], atol=1e-5)


@pytest.mark.parametrize("kind", ["block", "sdar"])
def test_rcr_on_block_models_is_the_same_with_and_without_the_kv_cache(tiny_policies, kind):
    policy = tiny_policies[kind]
    params = SamplingParams(temperature=1.0, max_tokens=4 * policy.spec.block_size, remasking="rcr",
                            steps_per_block=2, stop_at_eos=False, record_steps=True)
    requests = [GenerationRequest(torch.tensor([12, 13, 14, 15, 16][: 2 + k]), params, seed=k, request_id=str(k))
                for k in range(3)]
    cached = TorchEngine(policy, kv_cache="block").generate(requests)
    plain = TorchEngine(policy, kv_cache="none").generate(requests)
    for a, b in zip(cached, plain, strict=True):
        a.validate()
        assert a.response_ids.tolist() == b.response_ids.tolist() and a.step_map.tolist() == b.step_map.tolist()
        assert a.step_states.tolist() == b.step_states.tolist()
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
