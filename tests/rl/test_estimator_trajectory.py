"""Trajectory estimator vs a naive one-forward-per-step reference, and its forward-pass budget."""
from __future__ import annotations

import pytest
import torch

from rl.estimators.base import EstimatorInput
from rl.estimators.trajectory import trajectory_estimator
from rollout.models.masks import sequence_bias


def synthetic_step_map(n_blocks: int, block_size: int, steps_per_block: int, gen: torch.Generator) -> torch.Tensor:
    """Block decoding order: each block uses every one of its steps at least once, blocks strictly in order."""
    steps = []
    for blk in range(n_blocks):
        local = torch.cat([torch.arange(steps_per_block),
                           torch.randint(0, steps_per_block, (block_size - steps_per_block,), generator=gen)])
        local = local[torch.randperm(block_size, generator=gen)]
        steps.append(blk * steps_per_block + local)
    return torch.cat(steps)


def naive_trajectory_logps(policy, prompt, response, step_map, block_size):
    """One full forward per global step, over exactly the context the decoder had at that step."""
    mask_id, p = policy.spec.mask_token_id, prompt.numel()
    out = torch.zeros(response.numel())
    for step in torch.unique(step_map).tolist():
        decoded_now = step_map == step
        state = response.clone()
        state[step_map >= step] = mask_id
        if policy.spec.is_block:
            blk = int(torch.nonzero(decoded_now)[0]) // block_size
            end = (blk + 1) * block_size
            seq = torch.cat([prompt, response[: blk * block_size], state[blk * block_size: end]])
            bias = sequence_bias(p, end, block_size)
        else:
            seq = torch.cat([prompt, state])
            bias = sequence_bias(p, response.numel(), block_size, full=True)
        with torch.no_grad():
            logits = policy.forward(seq[None], torch.arange(seq.numel())[None], bias).logits[0]
        rows = torch.nonzero(decoded_now).squeeze(-1)
        src = p + rows - (1 if policy.spec.logits_shift else 0)
        out[rows] = torch.log_softmax(logits[src], -1).gather(-1, response[rows, None]).squeeze(-1)
    return out


def _batch(policy, n_blocks_per_sample, block_size, steps_per_block, seed):
    g = torch.Generator().manual_seed(seed)
    prompts, responses, maps = [], [], []
    for n_blocks in n_blocks_per_sample:
        prompts.append(torch.randint(10, len(policy.tokenizer), (int(torch.randint(2, 7, (1,), generator=g)),),
                                     generator=g))
        responses.append(torch.randint(10, len(policy.tokenizer), (n_blocks * block_size,), generator=g))
        maps.append(synthetic_step_map(n_blocks, block_size, steps_per_block, g))
    keys = [f"s{i}" for i in range(len(responses))]
    return EstimatorInput(prompts, responses, keys, step_maps=maps, block_size=block_size)


# Synthetic step maps here are cut into blocks from the response start: the sdar model (absolute alignment) is
# scored with the estimator's `response` option (TraceRL's training layout); its own absolute layout is checked
# against real rollouts in test_trajectory_vs_engine.py and tests/rollout/test_block_alignment.py.
@pytest.mark.parametrize("shared_clean", [True, False])
@pytest.mark.parametrize("kind,alignment", [("block", None), ("sdar", "response")])
def test_block_trajectory_matches_naive_and_costs_steps_per_block(tiny_policies, kind, alignment, shared_clean):
    policy = tiny_policies[kind]
    bs, spb = policy.spec.block_size, 3
    inp = _batch(policy, [2, 6, 1], bs, spb, seed=0)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp, block_alignment=alignment, shared_clean=shared_clean)
    # Independent of the number of blocks (6 here): one forward per step group, or one in all (shared clean part).
    assert est.forwards == (1 if shared_clean else spb)
    for b in range(len(inp)):
        ref = naive_trajectory_logps(policy, inp.prompts[b], inp.responses[b], inp.step_maps[b], bs)
        assert torch.allclose(est.token_logp[b, : ref.numel()], ref, atol=1e-5)
    assert torch.allclose(est.seq_logp, (est.token_logp * est.token_mask).sum(-1))


def test_forward_count_does_not_grow_with_blocks(tiny_policies):
    policy = tiny_policies["block"]
    for shared_clean, forwards in ((False, 4), (True, 1)):
        few = trajectory_estimator(policy, _batch(policy, [1], 4, 4, seed=1), shared_clean=shared_clean)
        many = trajectory_estimator(policy, _batch(policy, [16], 4, 4, seed=1), shared_clean=shared_clean)
        assert few.forwards == many.forwards == forwards


def test_shrink_merges_consecutive_steps(tiny_policies):
    policy = tiny_policies["block"]
    inp = _batch(policy, [3], 4, 4, seed=2)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp, shrink=2, shared_clean=False)
    assert est.forwards == 2
    # Group g is scored from the state before its first step: tokens of local steps 0-1 see no step-1 tokens.
    local = torch.stack([inp.step_maps[0][i] % 4 for i in range(12)])
    assert torch.equal(est.step_ids[0], local // 2)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_full_attention_trajectory_matches_naive(tiny_policies, kind):
    policy = tiny_policies[kind]
    g = torch.Generator().manual_seed(3)
    length, steps = 8, 5
    step_map = torch.cat([torch.arange(steps), torch.randint(0, steps, (length - steps,), generator=g)])
    step_map = step_map[torch.randperm(length, generator=g)]
    prompt = torch.randint(10, 90, (4,), generator=g)
    response = torch.randint(10, 90, (length,), generator=g)
    inp = EstimatorInput([prompt], [response], ["x"], step_maps=[step_map], block_size=policy.spec.block_size)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp)
    assert est.forwards == steps
    ref = naive_trajectory_logps(policy, prompt, response, step_map, policy.spec.block_size)
    assert torch.allclose(est.token_logp[0], ref, atol=1e-5)


def test_gradients_flow_through_every_pass(tiny_model_dirs):
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["block"])
    inp = _batch(policy, [2, 3], 4, 2, seed=4)
    est = trajectory_estimator(policy, inp, return_entropy=True, return_hidden=True)
    est.seq_logp.sum().backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert est.hidden.shape == (2, 12, policy.hidden_size)
    assert torch.all(est.entropy[est.token_mask] > 0)
