"""The trajectory estimator's one-forward path for block models (shared clean part, `shared_clean=True`) against its
per-pass path (one forward per step group, each over `[prompt | clean | noisy]`): the same log-probs, entropies,
hidden states and parameter gradient, in one forward, for static and dynamic step maps, shrink 1 and 2, padded and
packed rows, both block alignments and a shifted-logit block model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rl.estimators.base import ESTIMATORS, EstimatorInput
from rl.estimators.trajectory import trajectory_estimator
from rollout.models.layout import RowPacking

TOL = 1e-5


def dynamic_step_map(n_blocks: int, block_size: int, max_steps: int, g: torch.Generator) -> torch.Tensor:
    """Blocks decoded in order, block k in a random number of steps 1..max_steps (dynamic decoding: some blocks
    finish early), every step of a block decoding at least one token."""
    steps, first = [], 0
    for _ in range(n_blocks):
        k = int(torch.randint(1, min(max_steps, block_size) + 1, (1,), generator=g))
        local = torch.cat([torch.arange(k), torch.randint(0, k, (block_size - k,), generator=g)])
        steps.append(first + local[torch.randperm(block_size, generator=g)])
        first += k
    return torch.cat(steps)


def static_step_map(n_blocks: int, block_size: int, steps: int, g: torch.Generator) -> torch.Tensor:
    """Every block in exactly `steps` steps."""
    out = []
    for blk in range(n_blocks):
        local = torch.cat([torch.arange(steps), torch.randint(0, steps, (block_size - steps,), generator=g)])
        out.append(blk * steps + local[torch.randperm(block_size, generator=g)])
    return torch.cat(out)


def _batch(policy, dynamic: bool, seed: int) -> EstimatorInput:
    g = torch.Generator().manual_seed(seed)
    bs, vocab = policy.spec.block_size, len(policy.tokenizer)
    prompts, responses, maps = [], [], []
    for n_blocks in (2, 4, 1, 3):
        prompts.append(torch.randint(10, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g))
        responses.append(torch.randint(10, vocab, (n_blocks * bs,), generator=g))
        make = dynamic_step_map if dynamic else static_step_map
        maps.append(make(n_blocks, bs, 4, g))
    if dynamic:  # a sample decoded in one step per block: it has fewer groups than the others
        maps[2] = torch.arange(responses[2].numel()) // bs
    return EstimatorInput(prompts, responses, [f"s{i}" for i in range(len(prompts))], step_maps=maps, block_size=bs)


def _policy(tiny_policies, kind, logits_shift):
    from rollout.models.policy import DiffusionPolicy

    base = tiny_policies[kind]
    if not logits_shift:
        return base
    return DiffusionPolicy(base.model, base.tokenizer, dataclasses.replace(base.spec, logits_shift=True),
                           attention_kernel=base.attention_kernel)


def _run(policy, inp, shared_clean, **kw):
    """The estimate and d sum(seq_logp) / d parameters (autograd.grad: the shared policies' .grad untouched)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    est = trajectory_estimator(policy, inp, shared_clean=shared_clean, return_entropy=True, return_hidden=True,
                               **kw)
    grads = torch.autograd.grad(est.seq_logp.sum(), params, allow_unused=True)
    return est, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shrink", [1, 2])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind,alignment,logits_shift", [("block", None, False), ("sdar", None, False),
                                                         ("sdar", "response", False), ("block", None, True)])
def test_one_forward_equals_one_forward_per_pass(tiny_policies, kind, alignment, logits_shift, dynamic, shrink,
                                                 packed):
    policy = _policy(tiny_policies, kind, logits_shift)
    inp = _batch(policy, dynamic, seed=3 * shrink + dynamic)
    kw = {"shrink": shrink, "block_alignment": alignment, "packing": RowPacking(None) if packed else None}
    shared, shared_grads = _run(policy, inp, True, **kw)
    passes, pass_grads = _run(policy, inp, False, **kw)
    assert shared.forwards == 1 and passes.forwards > 1
    assert torch.equal(shared.step_ids, passes.step_ids) and torch.equal(shared.token_mask, passes.token_mask)
    assert (shared.token_logp - passes.token_logp).abs().max().item() <= TOL
    assert (shared.seq_logp - passes.seq_logp).abs().max().item() <= TOL
    assert (shared.entropy - passes.entropy).abs().max().item() <= TOL
    assert (shared.hidden - passes.hidden).abs().max().item() <= TOL
    assert torch.equal(shared.extra["token_elbo"], shared.token_logp)
    scored = shared.token_mask
    assert bool((shared.token_logp[scored] < 0).all())  # every real token scored (none left at 0)
    for a, b in zip(shared_grads, pass_grads):
        assert (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())
    assert any(g.abs().sum() > 0 for g in shared_grads)


def test_full_attention_models_keep_one_forward_per_group(tiny_policies):
    policy = tiny_policies["llada"]
    g = torch.Generator().manual_seed(5)
    step_map = torch.randperm(8, generator=g) // 2  # 4 global steps
    inp = EstimatorInput([torch.randint(10, 90, (4,), generator=g)], [torch.randint(10, 90, (8,), generator=g)],
                         ["x"], step_maps=[step_map], block_size=policy.spec.block_size)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp)  # shared_clean=True by default: no effect without a clean part
    assert est.forwards == 4


def test_shared_clean_is_a_registered_option_the_recipe_accepts():
    from launch.recipe_estimators import TrajectoryEstimator

    assert ESTIMATORS.defaults("trajectory")["shared_clean"] is True
    assert TrajectoryEstimator().params()["shared_clean"] is True
    assert TrajectoryEstimator(shared_clean=False).params()["shared_clean"] is False
    with pytest.raises(ValueError):
        TrajectoryEstimator(shared_clean="sometimes")
