"""Packed learner batches (learner.pack_tokens): the same update as padded micro-batches, for the trajectory
estimator and the ELBO estimators, block and full-attention models; the token-budget planner."""
from __future__ import annotations

import pytest
import torch

from rl.learner import Learner, LearnerConfig, ValueConfig
from rl.learner_batch import plan_update
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.models.loading import load_policy
from rollout.trajectory import Trajectory

LENGTHS = (4, 16, 8, 4, 12, 4)  # mixed response lengths (whole blocks of 4), so short samples share rows


def mixed_trajectories(policy, *, seed: int = 0) -> list[ScoredSample]:
    """Block-decoded rollouts of mixed lengths (2 steps per block of 4), advantages -1/+1, varied prompts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate(LENGTHS):
        resp = torch.randint(10, 90, (length,), generator=g)
        steps = torch.cat([torch.randperm(4, generator=g) % 2 + 2 * b for b in range(length // 4)])
        prompt = torch.randint(10, 90, (3 + (5 * i) % 7,), generator=g)
        traj = Trajectory(prompt_ids=prompt, response_ids=resp, step_map=steps, logprobs=torch.zeros(length),
                          confidence=torch.zeros(length), valid_length=length - (i % 3), nfe=4,
                          finish_reason="eos", block_size=4, request_id=f"m{i}")
        out.append(ScoredSample(traj, advantage=0.5 + i if i % 2 else -1.0 - 0.25 * i, reward=float(i % 2)))
    return out


def linear_adam() -> OptimConfig:
    """AdamW whose first step is ~ the gradient (eps >> |g|): weight deltas measure the gradient itself."""
    return OptimConfig(lr=1e4, eps=1e4, betas=(0.9, 0.999))


def _run(path, cfg: LearnerConfig):
    """One update on a fresh policy; returns (weight deltas, metrics, rows per scoring forward, docs per row)."""
    policy = load_policy(path)
    w0 = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    rows, docs = [], []
    forward = policy.forward

    def spy(input_ids, position_ids, attn_bias, **kw):
        rows.append(int(input_ids.shape[0]))
        # position ids restart at 0 at each document's start (and at an absolute-aligned canvas whose origin is 0):
        # an upper bound on documents per row; with fewer rows than samples, rows are shared
        docs.append(int((position_ids == 0).sum(dim=1).max()))
        return forward(input_ids, position_ids, attn_bias, **kw)

    policy.forward = spy
    metrics = Learner(policy, cfg).update(mixed_trajectories(policy))
    deltas = {k: v.detach() - w0[k] for k, v in policy.model.state_dict().items()}
    return deltas, metrics, rows, docs


CASES = [("tracerl", "trajectory", "block"), ("tracerl", "trajectory", "sdar"), ("tracerl", "trajectory", "llada"),
         ("diffu_grpo", "one_step", "block"), ("diffu_grpo", "one_step", "dream"), ("gdpo", "block_elbo", "sdar")]


@pytest.mark.parametrize("algorithm,estimator,kind", CASES)
def test_packed_update_equals_padded_update(tiny_model_dirs, algorithm, estimator, kind):
    """One micro-batch of all six samples, padded (one per row) vs packed (shared rows): weights within 1e-6 after
    one update and every metric equal; then a token budget that cuts three micro-batches: the same weights."""
    path = tiny_model_dirs[kind]
    base = dict(algorithm=algorithm, estimator=estimator, mu=1, grad_clip=None, optim=linear_adam(), shuffle=False)
    padded, m_pad, rows_pad, _ = _run(path, LearnerConfig(micro_batch_size=len(LENGTHS), **base))
    packed, m_pack, rows_pack, docs = _run(path, LearnerConfig(micro_batch_size=1, pack_tokens=10**6, **base))
    assert sum(rows_pack) < sum(rows_pad) and max(docs) >= 2  # rows really were shared
    assert max(float(d.abs().max()) for d in padded.values()) > 1e-3  # the update did something
    for k, d in padded.items():
        torch.testing.assert_close(packed[k], d, rtol=0, atol=1e-6, msg=k)
    timing = {"time_s", "time_old_s"}
    assert set(m_pack) == set(m_pad)
    for key in set(m_pad) - timing:
        assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-5, abs=1e-7), key
    one_row, _, rows_one, docs_one = _run(path, LearnerConfig(micro_batch_size=1, pack_tokens=10**6,
                                                              pack_row_tokens=10**6, **base))
    assert max(rows_one) == 1 and max(docs_one) >= len(LENGTHS)  # every sample in the one row of a forward
    for k, d in padded.items():
        torch.testing.assert_close(one_row[k], d, rtol=0, atol=1e-6, msg=k)
    budget = 60 if kind in ("block", "sdar") else 30  # layout tokens: block 2L + P (+ head), full L + P
    split, m_split, _, _ = _run(path, LearnerConfig(pack_tokens=budget, **base))
    assert m_split["optimizer_steps"] == 1
    assert m_split["forwards"] > m_pack["forwards"]  # more micro-batches, each its own forwards
    for k, d in padded.items():
        torch.testing.assert_close(split[k], d, rtol=0, atol=1e-6, msg=k)


def test_packed_update_with_a_value_model_equals_padded(tiny_model_dirs):
    """TraceRL's value head reads hidden states at each token's noisy position: the same from packed rows.
    The policy's AdamW is the linear one: with its default eps, gradients near 0 are divided by ~eps, which turns
    summation-order noise (packed and padded rows are different attention chunks) into 1e-6 weight differences."""
    path = tiny_model_dirs["block"]
    heads = []
    for pack in (None, 10**6):
        policy = load_policy(path)
        cfg = LearnerConfig(algorithm="tracerl", mu=2, micro_batch_size=len(LENGTHS), pack_tokens=pack,
                            value=ValueConfig(lr=1e-2), grad_clip=None, optim=linear_adam(), shuffle=False)
        learner = Learner(policy, cfg)
        metrics = learner.update(mixed_trajectories(policy))
        heads.append(({k: v.detach().clone() for k, v in learner.value_head.state_dict().items()},
                      {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, metrics))
    (head_a, w_a, m_a), (head_b, w_b, m_b) = heads
    assert m_a["value_loss"] > 0
    for key in ("value_loss", "value_mean", "return_mean", "loss"):
        assert m_b[key] == pytest.approx(m_a[key], rel=1e-5, abs=1e-7), key
    for k in head_a:
        torch.testing.assert_close(head_b[k], head_a[k], rtol=0, atol=1e-6)
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=0, atol=1e-6)


ESTIMATOR_KINDS = [("trajectory", "block", {}), ("trajectory", "sdar", {"block_alignment": "response"}),
                   ("one_step", "block", {}), ("mc_elbo", "llada", {}), ("sdmc", "dream", {}),
                   ("coupled", "llada", {"full_mask_view": True}), ("block_elbo", "sdar", {}),
                   ("block_random", "llada", {}), ("random_mask", "block", {})]


@pytest.mark.parametrize("name,kind,options", ESTIMATOR_KINDS, ids=[f"{n}-{k}" for n, k, _ in ESTIMATOR_KINDS])
def test_every_estimator_gives_the_same_estimate_packed(tiny_policies, name, kind, options):
    """Packing changes neither an estimator's mask draws (per-sample generators) nor its scores per sample."""
    from rl.estimators import get_estimator
    from rl.estimators.base import EstimatorInput
    from rollout.models.layout import RowPacking

    policy = tiny_policies[kind]
    trajs = [s.trajectory for s in mixed_trajectories(policy)]
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], [t.valid_length for t in trajs],
                         [t.step_map for t in trajs], 4)
    estimator = get_estimator(name)
    with torch.no_grad():
        plain = estimator(policy, inp, seed=7, return_entropy=True, **options)
        packed = estimator(policy, inp, seed=7, return_entropy=True, packing=RowPacking(), **options)
        one_row = estimator(policy, inp, seed=7, packing=RowPacking(row_tokens=10**6), **options)
    assert torch.equal(plain.token_mask, packed.token_mask) and plain.forwards == packed.forwards
    for est in (packed, one_row):
        torch.testing.assert_close(est.token_logp, plain.token_logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(est.seq_logp, plain.seq_logp, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(packed.entropy, plain.entropy, rtol=0, atol=1e-5)


def test_token_budget_plan_same_micro_batch_count_on_every_rank():
    tokens = [30, 5, 12, 40, 7, 7, 22, 3, 18, 9, 31, 2]
    plans = [plan_update(len(tokens), mu=2, micro_batch_size=2, grad_accum=3, world_size=2, rank=r, shuffle=True,
                         seed=5, pack_tokens=32, sample_tokens=tokens) for r in range(2)]
    again = plan_update(len(tokens), mu=2, micro_batch_size=2, grad_accum=3, world_size=2, rank=0, shuffle=True,
                        seed=5, pack_tokens=32, sample_tokens=tokens)
    assert again == plans[0]  # deterministic
    padded = plan_update(len(tokens), mu=2, micro_batch_size=2, grad_accum=3, world_size=2, rank=0, shuffle=True,
                         seed=5)
    for it in range(2):
        assert len(plans[0][it]) == len(plans[1][it]) == len(padded[it]) == 1  # minibatches still count samples
        for m in range(len(plans[0][it])):
            assert len(plans[0][it][m]) == len(plans[1][it][m])  # ZeRO-3: the same number of forwards
            seen = sorted(i for r in range(2) for micro in plans[r][it][m] for i in micro)
            assert seen == list(range(len(tokens)))
            for r in range(2):
                for micro in plans[r][it][m]:
                    assert len(micro) == 1 or sum(tokens[i] for i in micro) <= 32
            assert any(len(micro) > 1 for r in range(2) for micro in plans[r][it][m])
    with pytest.raises(ValueError, match="sample_tokens"):
        plan_update(3, mu=1, micro_batch_size=1, grad_accum=None, pack_tokens=8)


def test_pack_row_tokens_needs_pack_tokens(tiny_policies):
    with pytest.raises(ValueError, match="learner.pack_row_tokens: needs learner.pack_tokens"):
        Learner(tiny_policies["block"], LearnerConfig(pack_row_tokens=64))


def test_pooled_step_loss_refuses_packing(tiny_policies):
    with pytest.raises(ValueError, match="learner.pack_tokens: loss_agg 'step_pooled_mean'"):
        Learner(tiny_policies["block"], LearnerConfig(algorithm="cj_grpo", estimator="trajectory", pack_tokens=64))


@pytest.mark.parametrize("name,kind,options", [("trajectory", "block", {}), ("trajectory", "sdar", {}),
                                               ("trajectory", "block", {"shared_clean": False}),
                                               ("trajectory", "block", {"shrink": 2}),
                                               ("one_step", "block", {}), ("block_elbo", "sdar", {}),
                                               ("ar_exact", "block", {"check_order": False})])
def test_token_budget_counts_the_layout_each_forward_lays_out(tiny_policies, name, kind, options):
    """learner.pack_tokens plans micro-batches by each sample's layout size: what `layout_tokens` says must be the
    longest row a sample scored alone occupies in any of its forwards (the trajectory estimator's one forward
    holds a noisy canvas per step group: about twice the single-canvas layout here)."""
    from rl.estimators import get_estimator
    from rl.estimators.base import EstimatorInput, layout_tokens

    policy = tiny_policies[kind]
    estimator = get_estimator(name)
    params = {**({"shrink": 1, "shared_clean": True} if name == "trajectory" else {}), **options}
    trajs = [s.trajectory for s in mixed_trajectories(policy)]
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], [t.valid_length for t in trajs],
                         [t.step_map for t in trajs], 4)
    counted = layout_tokens(estimator, policy.spec, inp, params)
    forward, widths = policy.forward, []

    def spy(input_ids, position_ids, attn_bias, **kw):
        widths.append(int(input_ids.shape[1]))
        return forward(input_ids, position_ids, attn_bias, **kw)

    policy.forward = spy
    try:
        for b in range(len(inp)):
            widths.clear()
            alone = EstimatorInput([inp.prompts[b]], [inp.responses[b]], [inp.sample_keys[b]],
                                   [inp.valid_lengths[b]], [inp.step_maps[b]], 4)
            with torch.no_grad():
                estimator(policy, alone, seed=7, **params)
            assert counted[b] == max(widths), (b, counted[b], widths)
    finally:
        policy.forward = forward
    if name == "trajectory" and params["shared_clean"] and params["shrink"] == 1:  # 2 steps per block: 2 copies
        single = layout_tokens(get_estimator("one_step"), policy.spec, inp, {})
        assert all(c > s for c, s in zip(counted, single))
