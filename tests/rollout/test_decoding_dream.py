"""Dream's and LLaDA's own decoding loops, re-implemented naively here, against diffrl's full-attention decoder.

`naive_sample` follows Dream's `DreamGenerationMixin._sample` (generation_utils.py shipped with the Dream
checkpoints; read in docs/FIDELITY.md) step by step over the whole canvas: times t = linspace(1, 1e-3, S + 1) in
float32, logits shifted right by one (position i predicts from i-1), and per step either `origin` (each masked
token transferred with probability 1 - s/t) or a fixed count int(n_masked * (1 - s/t)) (all that is left at the
last step) taken by top-k of the algorithm's score: the sampled token's probability (maskgit_plus), the top-1 minus
top-2 probability (topk_margin) or sum p * log(p + 1e-10) (entropy). With `blocks` it is LLaDA's `generate`
instead: semi-autoregressive blocks, LLaDA's even split (remainder to the first steps), no shift.

Random numbers: Dream draws from torch's global RNG (Categorical sampling, torch.rand for origin), which no
batch-independent decoder can reproduce. The reference therefore draws where diffrl documents it draws (one
uniform per masked position per step from the request's generator for inverse-CDF sampling, then origin's one
uniform per masked position): a temperature run checks everything but the source of the uniforms.
"""
from __future__ import annotations

import pytest
import torch

from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.sampling import GenerationRequest, SamplingParams

ALGS = {"maskgit_plus": "low_confidence_static", "topk_margin": "topk_margin", "entropy": "entropy",
        "origin": "origin"}


def naive_sample(policy, prompts, length, steps, alg, temperature=0.0, seeds=None, llada_block=None):
    """Returns (tokens, step, logprob) per prompt, each (length,), as the reference loop produced them."""
    spec = policy.spec
    mask, pad = spec.mask_token_id, spec.pad_token_id
    width_prompt = max(p.numel() for p in prompts)
    width = width_prompt + length
    batch = len(prompts)
    x = torch.full((batch, width), pad, dtype=torch.long)
    attend = torch.zeros((batch, width), dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, width_prompt - p.numel():width_prompt] = p
        attend[b, width_prompt - p.numel():] = True
    x[:, width_prompt:] = mask
    tok_idx = (attend.long().cumsum(-1) - 1).masked_fill(~attend, 1)  # Dream's position ids under padding
    bias = torch.zeros((batch, 1, width, width))
    bias.masked_fill_(~attend[:, None, None, :], float("-inf"))
    gens = [torch.Generator().manual_seed(s) for s in (seeds or range(batch))]
    step_of = torch.full((batch, width), -1, dtype=torch.long)
    logp_of = torch.zeros((batch, width))
    times = torch.linspace(1, 1e-3, steps + 1)

    def forward():
        with torch.no_grad():
            logits = policy.forward(x, tok_idx, bias).logits.float()
        if spec.logits_shift:  # Dream: the logits for position i come from position i-1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def draw(b, logits):
        """Token and log-prob per row of (n, V) logits for prompt b (greedy: argmax, raw log-softmax)."""
        if temperature == 0:
            logp = torch.log_softmax(logits, dim=-1)
            tok = logp.argmax(-1)
        else:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            u = torch.rand(logits.shape[0], 1, generator=gens[b])
            cdf = logp.exp().cumsum(-1)
            tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1), logp

    def score(logp, tok_logp):
        probs = logp.exp()
        if alg == "maskgit_plus":
            return tok_logp.exp()
        if alg == "topk_margin":
            top = probs.sort(dim=-1, descending=True).values
            return top[:, 0] - top[:, 1]
        if alg == "entropy":
            return (probs * torch.log(probs + 1e-10)).sum(-1)
        raise AssertionError(alg)

    global_step = 0
    regions = [(width_prompt, width)] if llada_block is None else [
        (width_prompt + k, width_prompt + k + llada_block) for k in range(0, length, llada_block)]
    for lo, hi in regions:
        n_block = hi - lo
        for i in range(steps):
            masked = x == mask
            masked[:, hi:] = False  # LLaDA: later blocks wait (Dream: one region, the whole response)
            t, s = times[i], times[i + 1]
            if llada_block is None and alg != "origin":
                n_avg = masked.sum() / batch  # Dream averages the masked count over the batch
                count = int(n_avg * (1 - s / t)) if i < steps - 1 else int(n_avg)
                if count == 0:
                    # Dream still runs this step's forward and sampling, then keeps nothing (the first step when
                    # steps == length); diffrl skips it, so nothing is drawn here either.
                    continue
            elif llada_block is not None:
                count = n_block // steps + (1 if i < n_block % steps else 0)
            logits = forward()
            for b in range(batch):
                cols = masked[b].nonzero().squeeze(-1)
                if cols.numel() == 0:
                    continue
                tok, tok_logp, logp = draw(b, logits[b, cols])
                if alg == "origin":
                    p_transfer = 1 - s / t if i < steps - 1 else 1
                    take = torch.rand(cols.numel(), generator=gens[b]) < p_transfer
                    chosen = cols[take]
                    tok, tok_logp = tok[take], tok_logp[take]
                else:
                    full = torch.full((width,), float("-inf"))
                    if llada_block is None:
                        full[cols] = score(logp, tok_logp)
                    else:  # LLaDA ranks by the untempered model probability of the sampled token
                        raw = torch.softmax(logits[b, cols], dim=-1)
                        full[cols] = raw.gather(-1, tok[:, None]).squeeze(-1)
                    chosen = torch.topk(full, count).indices
                    where = {int(c): k for k, c in enumerate(cols)}
                    pick = torch.tensor([where[int(c)] for c in chosen], dtype=torch.long)
                    tok, tok_logp = tok[pick], tok_logp[pick]
                x[b, chosen] = tok
                step_of[b, chosen] = global_step
                logp_of[b, chosen] = tok_logp
            global_step += 1
    assert not bool((x == mask).any()), "the reference left masks"
    return [(x[b, width_prompt:], step_of[b, width_prompt:], logp_of[b, width_prompt:]) for b in range(batch)]


def _decode(policy, prompts, length, steps, remasking, temperature=0.0, seeds=None, schedule=None):
    params = SamplingParams(temperature=temperature, max_tokens=length, steps_per_block=steps,
                            remasking=remasking, schedule=schedule, stop_at_eos=False)
    seeds = list(seeds or range(len(prompts)))
    out = TorchEngine(policy, kv_cache="none").generate(
        [GenerationRequest(p, params, seed=s) for p, s in zip(prompts, seeds)])
    for t in out:
        t.validate()
    return out


def _dense(steps: torch.Tensor) -> torch.Tensor:
    # diffrl skips fixed-count steps that would unmask nothing (their forward changes nothing); compare order only.
    return torch.unique(steps, return_inverse=True)[1]


def _sharpened(path, block_size):
    """The tiny model with its output layer scaled 10x: a random model's distributions are near-uniform (entropies
    within 4e-3 of each other, gaps down to 1e-5), so float rounding would decide rankings; scaled, they spread
    over 3.0-4.2 nats like a model that has learnt something, and a wrong rule cannot pass by luck."""
    policy = load_policy(path, block_size=block_size)
    with torch.no_grad():
        policy.causal_lm.lm_head.weight.mul_(10.0)
    return policy


def _prompts(policy, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, len(policy.tokenizer), (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def dream_dir(tiny_model_dirs):
    return tiny_model_dirs["dream"]


SETTINGS = [(16, 8), (16, 16), (24, 5), (32, 16)]


@pytest.mark.parametrize("alg", list(ALGS))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_dream_decoding_equals_dreams_sample_alone_and_batched(dream_dir, alg, temperature):
    for length, steps in SETTINGS:
        policy = _sharpened(dream_dir, length)  # Dream: one block the length of the response
        assert policy.spec.step_schedule == "dream"
        prompts = _prompts(policy, (3, 9, 5), seed=length + steps)
        seeds = [11, 12, 13]
        batched_ref = naive_sample(policy, prompts, length, steps, alg, temperature, seeds)
        ours = _decode(policy, prompts, length, steps, ALGS[alg], temperature, seeds)
        for b, ref in enumerate(batched_ref):
            alone_ref = naive_sample(policy, [prompts[b]], length, steps, alg, temperature, [seeds[b]])[0]
            alone = _decode(policy, [prompts[b]], length, steps, ALGS[alg], temperature, [seeds[b]])[0]
            # Alone against alone, batched against batched: padding moves logits by float rounding, which can
            # reorder near-ties of a random model's scores (entropies of near-uniform distributions) in both loops.
            for traj, (tokens, step, logp) in ((ours[b], ref), (alone, alone_ref)):
                where = f"{alg} T={temperature} length {length} steps {steps} prompt {b}"
                assert torch.equal(traj.response_ids, tokens), where
                assert torch.equal(_dense(traj.step_map), _dense(step)), where
                assert torch.allclose(traj.logprobs, logp, atol=1e-5), where


def test_dreams_schedule_is_what_makes_the_difference(dream_dir):
    """The same comparison with LLaDA's even split (diffrl's schedule for Dream before issue 17) fails."""
    differ = total = 0
    for length, steps in SETTINGS:
        policy = _sharpened(dream_dir, length)
        prompts = _prompts(policy, (3, 9, 5), seed=length + steps)
        ref = naive_sample(policy, prompts, length, steps, "maskgit_plus")
        even = _decode(policy, prompts, length, steps, "low_confidence_static", schedule="uniform")
        assert len(even) == len(ref) > 0
        differ += sum(int((t.response_ids != r[0]).sum()) for t, r in zip(even, ref))
        total += length * len(prompts)
    print(f"even split vs Dream's _sample: {differ}/{total} tokens differ")
    assert differ > 0


def test_recorded_logprobs_are_recomputed_by_the_learner_for_dreams_algorithms(dream_dir):
    policy = _sharpened(dream_dir, 16)
    for remasking in ("topk_margin", "entropy", "origin"):
        for traj in _decode(policy, _prompts(policy, (4, 7)), 16, 8, remasking, temperature=0.9):
            steps = [int(s) for s in torch.unique(traj.step_map)]
            scores = policy.score_responses(
                [traj.prompt_ids] * len(steps), [traj.response_ids] * len(steps),
                [traj.state_before_step(s, policy.spec.mask_token_id) for s in steps],
                score_mask=[traj.step_map == s for s in steps], temperature=0.9,
            )
            assert torch.allclose((scores.logprobs * scores.valid).sum(0), traj.logprobs, atol=1e-4), remasking


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("length,block,steps", [(16, 8, 4), (24, 8, 3), (16, 16, 5)])
def test_llada_decoding_equals_lladas_generate(tiny_model_dirs, length, block, steps, temperature):
    """LLaDA's generate (low_confidence remasking): blocks, even split with the remainder first, ranked by the
    untempered probability of the sampled token (LLaDA samples by Gumbel-max from the same tempered distribution;
    the reference draws the uniforms as diffrl does)."""
    policy = _sharpened(tiny_model_dirs["llada"], block)
    assert (policy.spec.step_schedule, policy.spec.confidence_source) == ("uniform", "model")
    prompts = _prompts(policy, (3, 9, 5), seed=length)
    ref = naive_sample(policy, prompts, length, steps, "maskgit_plus", temperature, [11, 12, 13], llada_block=block)
    ours = _decode(policy, prompts, length, steps, "low_confidence_static", temperature, [11, 12, 13])
    assert len(ours) == len(ref) > 0
    for traj, (tokens, step, logp) in zip(ours, ref):
        assert torch.equal(traj.response_ids, tokens)
        assert torch.equal(traj.step_map, step)
        assert torch.allclose(traj.logprobs, logp, atol=1e-5)
