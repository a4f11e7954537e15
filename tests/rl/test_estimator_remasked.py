"""dTRPO's one-forward trajectory estimate vs the per-step recomputation (naive: one forward per global step).

Where the paper says they coincide: averaged over every possible draw (each block's step), the one-forward estimate
equals the trajectory log-likelihood exactly (unbiased), and each single draw scores exactly the naive per-step
log-probs of the tokens it picks.
"""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from rl.estimators.base import EstimatorInput
from rl.estimators.remasked import (
    RemaskDraw,
    draw_remask,
    remasked_step_estimator,
    score_remasked,
)
from rollout.trajectory import block_local_steps

# The naive per-step recomputation and synthetic step maps of the trajectory estimator's own test.
_spec = importlib.util.spec_from_file_location("_trajectory_helpers",
                                               Path(__file__).with_name("test_estimator_trajectory.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
naive_trajectory_logps = _helpers.naive_trajectory_logps
synthetic_step_map = _helpers.synthetic_step_map


def _sample(policy, n_blocks, block_size, steps_per_block, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, len(policy.tokenizer), (block_size,), generator=g)  # whole blocks: no head
    response = torch.randint(10, len(policy.tokenizer), (n_blocks * block_size,), generator=g)
    return prompt, response, synthetic_step_map(n_blocks, block_size, steps_per_block, g)


def test_block_estimate_is_unbiased_over_every_draw_and_costs_one_forward(tiny_policies):
    policy = tiny_policies["block"]
    bs, spb, blocks = policy.spec.block_size, 3, 2
    prompt, response, step_map = _sample(policy, blocks, bs, spb, seed=0)
    inp = EstimatorInput([prompt], [response], ["s0"], step_maps=[step_map], block_size=bs)
    naive = naive_trajectory_logps(policy, prompt, response, step_map, bs)
    local = block_local_steps(step_map, bs)
    block_ids = torch.arange(response.numel()) // bs
    estimates = []
    with torch.no_grad():
        for choice in itertools.product(range(spb), repeat=blocks):  # every draw, each of probability 1/spb^blocks
            draw = RemaskDraw(local, block_ids, torch.tensor(choice))
            est = score_remasked(policy, inp, [draw])
            assert est.forwards == 1
            scored = draw.scored
            # a draw scores exactly the per-step log-probs of the tokens newly unmasked at its steps
            assert torch.allclose(est.token_logp[0][scored], naive[scored], atol=1e-5)
            estimates.append(float(est.seq_logp[0]))
    mean = sum(estimates) / len(estimates)
    assert mean == pytest.approx(float(naive.sum()), abs=1e-4)
    assert max(estimates) - min(estimates) > 1e-2  # the draws differ: the mean is not a coincidence


def test_full_attention_estimate_is_unbiased(tiny_policies):
    policy = tiny_policies["llada"]
    g = torch.Generator().manual_seed(3)
    length, steps = 6, 4
    step_map = torch.cat([torch.arange(steps), torch.randint(0, steps, (length - steps,), generator=g)])
    step_map = step_map[torch.randperm(length, generator=g)]
    prompt = torch.randint(10, 90, (4,), generator=g)
    response = torch.randint(10, 90, (length,), generator=g)
    inp = EstimatorInput([prompt], [response], ["x"], step_maps=[step_map], block_size=policy.spec.block_size)
    naive = naive_trajectory_logps(policy, prompt, response, step_map, policy.spec.block_size)
    local = torch.searchsorted(torch.unique(step_map), step_map)
    with torch.no_grad():
        values = [float(score_remasked(policy, inp, [RemaskDraw(local, torch.zeros(length, dtype=torch.long),
                                                                  torch.tensor([j]))]).seq_logp[0])
                  for j in range(steps)]
    assert sum(values) / steps == pytest.approx(float(naive.sum()), abs=1e-4)


def test_draws_are_per_sample_and_shared_by_policy_and_reference(tiny_policies):
    """The same (seed, key, inner_iter) gives the same re-masked state whatever the batch: the reference scores
    the state the policy scores (the dTRPO ratio's coefficients cancel)."""
    policy = tiny_policies["block"]
    bs = policy.spec.block_size
    samples = [_sample(policy, 3, bs, 4, seed=s) for s in range(3)]
    inp = EstimatorInput([s[0] for s in samples], [s[1] for s in samples], ["a", "b", "c"],
                         step_maps=[s[2] for s in samples], block_size=bs)
    with torch.no_grad():
        whole = remasked_step_estimator(policy, inp, seed=5)
        alone = remasked_step_estimator(policy, inp.select([1]), seed=5)
        other = remasked_step_estimator(policy, inp, seed=6)
    assert torch.equal(whole.token_mask[1], alone.token_mask[0])
    assert torch.allclose(whole.seq_logp[1], alone.seq_logp[0], atol=1e-5)
    assert not torch.equal(whole.token_mask, other.token_mask)  # a new seed draws new steps
    # exactly one step scored per block, weighted by that block's step count
    scored = whole.token_mask[0].view(3, bs)
    assert bool((scored.sum(1) >= 1).all())
    weights = whole.extra["remask_weights"][0].view(3, bs)
    assert torch.equal(weights[scored], torch.full_like(weights[scored], 4.0))


def test_draw_covers_every_step_uniformly():
    step_map = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])  # block 4: blocks have steps {0,1,2} and {3,4,5}
    counts = torch.zeros(2, 3)
    for s in range(600):
        draw = draw_remask(step_map, torch.Generator().manual_seed(s), block_size=4)
        counts[torch.arange(2), draw.chosen] += 1
    assert bool((counts > 150).all()), counts


def test_absolute_alignment_blocks_hold_the_prompt_tail(tiny_policies):
    """SDAR-style `absolute` blocks: the first training block also holds the prompt's tail, so it has fewer
    response tokens; the draws follow the model's own blocks and stay unbiased for the trajectory estimator's
    log-likelihood (which handles the same layout, checked against rollouts in test_trajectory_vs_engine.py)."""
    from rl.estimators.remasked import block_ids_of
    from rl.estimators.trajectory import trajectory_estimator

    policy = tiny_policies["sdar"]
    bs = policy.spec.block_size
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(10, 90, (bs + 1,), generator=g)  # one prompt token in the first response block
    head = prompt.numel() - policy.spec.block_origin(prompt.numel())
    assert head == 1
    sizes = [bs - head, bs, 2]  # response blocks: 3, 4 and a last partial one
    steps, base = [], 0
    for size in sizes:  # each block decoded over 2 steps (both used), blocks in order
        local = torch.cat([torch.tensor([0, 1]), torch.randint(0, 2, (size - 2,), generator=g)])
        steps.append(base + local[torch.randperm(size, generator=g)])
        base += 2
    step_map = torch.cat(steps)
    response = torch.randint(10, 90, (step_map.numel(),), generator=g)
    inp = EstimatorInput([prompt], [response], ["abs"], step_maps=[step_map], block_size=bs)
    with torch.no_grad():
        target = float(trajectory_estimator(policy, inp).seq_logp[0])
        local = block_local_steps(step_map, bs, head)
        blocks = block_ids_of(step_map.numel(), bs, head)
        assert blocks.tolist() == [0] * 3 + [1] * 4 + [2] * 2
        values = [float(score_remasked(policy, inp, [RemaskDraw(local, blocks, torch.tensor(c))]).seq_logp[0])
                  for c in itertools.product(range(2), repeat=3)]
        drawn = remasked_step_estimator(policy, inp, seed=1)
    assert sum(values) / len(values) == pytest.approx(target, abs=1e-4)
    # the registered estimator draws on the same blocks: one scored step per block, weight 2 each
    scored = drawn.token_mask[0]
    for b in range(3):
        in_block = blocks == b
        assert len(set(local[in_block & scored].tolist())) == 1
    assert torch.equal(drawn.extra["remask_weights"][0][scored], torch.full((int(scored.sum()),), 2.0))
