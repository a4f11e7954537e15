"""Fast-dLLM's prefix and dual caches for LLaDA, re-implemented naively with transformers' own DynamicCache, against
diffrl's full-attention decoder (its ragged cache and masks are not used by the reference).

Fast-dLLM (`generate_with_prefix_cache` / `generate_with_dual_cache`), per block: the first step runs the whole
canvas and keeps its KV; later steps run only [block start, end of canvas) on the KV of the tokens before the block
(prefix), or only the block on the KV before and after it, both from that first step (dual). LLaDA's even split and
low-confidence remasking choose the tokens. Greedy: Fast-dLLM's Gumbel noise is off at temperature 0.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.sampling import GenerationRequest, SamplingParams


def _forward(lm, ids, positions, kv_len, cache):
    """Full attention over every key (the past ones and the new ones); returns logits and the cache after."""
    bias = torch.zeros((1, 1, ids.shape[1], kv_len))
    out = lm.model(input_ids=ids, attention_mask=bias, position_ids=positions, past_key_values=cache, use_cache=True)
    return lm.lm_head(out.last_hidden_state)[0].float(), out.past_key_values


def _kv(cache, keep):
    return [(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in cache.layers]


def naive_fast_dllm(policy, prompt, length, block, steps, mode):
    lm, mask = policy.causal_lm, policy.spec.mask_token_id
    p = prompt.numel()
    x = torch.cat([prompt, torch.full((length,), mask)])[None]
    width = x.shape[1]
    positions = torch.arange(width)[None]
    step_of = torch.full((width,), -1)
    step = 0
    for start in range(p, width, block):
        end = start + block
        counts = [block // steps + (1 if i < block % steps else 0) for i in range(steps)]
        for i, count in enumerate(counts):
            with torch.no_grad():
                if i == 0:
                    logits, full = _forward(lm, x, positions, width, None)
                    kept = _kv(full, slice(None))  # the first step's KV of the whole canvas
                    lo = 0
                elif mode == "prefix":
                    past = DynamicCache(ddp_cache_data=[(k[:, :, :start], v[:, :, :start]) for k, v in kept])
                    logits, _ = _forward(lm, x[:, start:], positions[:, start:], width, past)
                    lo = start
                else:  # dual: keys before and after the block from the first step, the block's own fresh
                    past = DynamicCache(ddp_cache_data=[(torch.cat([k[:, :, :start], k[:, :, end:]], 2),
                                                         torch.cat([v[:, :, :start], v[:, :, end:]], 2))
                                                        for k, v in kept])
                    logits, _ = _forward(lm, x[:, start:end], positions[:, start:end], width, past)
                    lo = start
            probs = torch.softmax(logits, dim=-1)
            conf, tok = probs.max(dim=-1)
            candidates = torch.full((width,), float("-inf"))
            masked = (x[0] == mask).nonzero().squeeze(-1)
            masked = masked[(masked >= start) & (masked < end)]
            candidates[masked] = conf[masked - lo]
            chosen = torch.topk(candidates, count).indices
            x[0, chosen] = tok[chosen - lo]
            step_of[chosen] = step
            step += 1
    return x[0, p:], step_of[p:]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_llada_caches_equal_fast_dllms_loop(tiny_model_dirs, mode):
    block, length, steps = 8, 24, 4
    policy = load_policy(tiny_model_dirs["llada"], block_size=block)
    with torch.no_grad():
        policy.causal_lm.lm_head.weight.mul_(10.0)  # spread the scores (see test_decoding_dream._sharpened)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(10, len(policy.tokenizer), (n,), generator=g) for n in (3, 9, 6)]
    params = SamplingParams(temperature=0, max_tokens=length, remasking="low_confidence_static",
                            steps_per_block=steps, stop_at_eos=False)
    differ_exact = 0
    for prompt in prompts:
        tokens, step = naive_fast_dllm(policy, prompt, length, block, steps, mode)
        ours = TorchEngine(policy, kv_cache=mode).generate([GenerationRequest(prompt, params, seed=0)])[0]
        assert torch.equal(ours.response_ids, tokens)
        assert torch.equal(ours.step_map, step)
        exact = TorchEngine(policy, kv_cache="none").generate([GenerationRequest(prompt, params, seed=0)])[0]
        differ_exact += int((exact.response_ids != tokens).sum())
    print(f"{mode}: Fast-dLLM's loop and the exact decoder differ on {differ_exact} of {length * len(prompts)} tokens")
