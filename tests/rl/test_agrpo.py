"""AGRPO: the sampled-step estimate is unbiased (exact enumeration over step choices), the model scores the drawn
steps exactly as a naive per-step forward does, the loss equals a per-sample re-implementation of the reference's
equations, and the first on-policy inner step has ratio 1 and no clipping."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators.base import EstimatorInput
from rl.estimators.sampled_steps import (
    draw_steps,
    draw_uniforms,
    entropy_proposal,
    inverse_cdf_steps,
    last_content_step,
    sampled_steps_estimator,
    score_at_steps,
    token_weights,
)
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from tests.rl.test_estimator_trajectory import naive_trajectory_logps
from tests.rl.test_learner import make_trajectories

EOS = 3


def tiny_trajectory() -> tuple[torch.Tensor, torch.Tensor]:
    """8 tokens over 5 steps; step 4 wrote only EOS padding (never drawn), step 2 wrote an EOS and a word."""
    steps = torch.tensor([0, 1, 1, 2, 2, 3, 4, 4])
    response = torch.tensor([11, 12, 13, EOS, 14, 15, EOS, EOS])
    return steps, response


@pytest.mark.parametrize("objective", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_expected_estimate_is_the_per_step_objective_by_exact_enumeration(objective, k):
    steps, response = tiny_trajectory()
    last = last_content_step(steps, response, EOS)
    assert last == 3
    loss = torch.randn(steps.numel(), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    # Every outcome of K independent uniform draws over {0..T}, each with probability (T+1)^-K.
    expected = torch.zeros((), dtype=torch.float64)
    for draw in itertools.product(range(last + 1), repeat=k):
        draw = torch.tensor(draw)
        iw = torch.full((k,), 1.0 if objective == "mean" else last + 1.0, dtype=torch.float64)
        expected += (token_weights(steps, draw, iw) * loss).sum() / (last + 1) ** k
    full = sum(loss[steps == t].sum() for t in range(last + 1))  # EOS-only step 4 is outside the objective
    target = full / (last + 1) if objective == "mean" else full
    assert torch.allclose(expected, target, atol=1e-12)


@pytest.mark.parametrize("objective", ["mean", "sum"])
def test_entropy_proposal_estimate_is_unbiased_by_exact_enumeration(objective):
    steps, response = tiny_trajectory()
    entropy = torch.tensor([0.5, 2.0, 1.0, 0.0, 0.25, 3.0, 9.0, 9.0], dtype=torch.float64)
    last = last_content_step(steps, response, EOS)
    q = entropy_proposal(steps, entropy, last)
    # the reference's q: 1e-8 + summed entropies of the step's tokens, steps after T dropped, normalised
    raw = torch.tensor([0.5, 3.0, 0.25, 3.0], dtype=torch.float64) + 1e-8
    assert torch.allclose(q, raw / raw.sum())
    loss = torch.randn(steps.numel(), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    k = 2
    expected = torch.zeros((), dtype=torch.float64)
    for draw in itertools.product(range(last + 1), repeat=k):
        draw = torch.tensor(draw)
        iw = (1.0 / (last + 1) if objective == "mean" else 1.0) / q[draw]
        expected += (token_weights(steps, draw, iw) * loss).sum() * q[draw].prod()
    full = sum(loss[steps == t].sum() for t in range(last + 1))
    assert torch.allclose(expected, full / (last + 1) if objective == "mean" else full, atol=1e-10)


def test_inverse_cdf_maps_uniforms_to_the_proposal():
    q = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000  # a fine grid over [0, 1)
    freq = torch.bincount(inverse_cdf_steps(u, q), minlength=4).double() / u.numel()
    assert torch.allclose(freq, q, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    steps, response = tiny_trajectory()
    drawn, iw = draw_steps(steps, response, EOS, gen, 16, low_discrepancy=True, objective="mean", proposal="entropy",
                           token_entropy=torch.ones(8))
    q = entropy_proposal(steps, torch.ones(8), 3)
    assert torch.allclose(iw, 0.25 / q[drawn].double())
    with pytest.raises(ValueError, match="record_entropy"):
        draw_steps(steps, response, EOS, gen, 4, low_discrepancy=True, objective="mean", proposal="entropy")


def test_rollout_records_the_sampling_entropy_of_each_token(tiny_policies):
    from rl.estimators.trajectory import trajectory_estimator
    from rollout.engine import TorchEngine
    from rollout.sampling import GenerationRequest, SamplingParams

    policy = tiny_policies["block"]
    params = SamplingParams(temperature=1.0, max_tokens=8, remasking="random", steps_per_block=2,
                            record_entropy=True, stop_at_eos=False)
    trajs = TorchEngine(policy, kv_cache="block").generate(
        [GenerationRequest(torch.tensor([12, 13, 14]), params, seed=s, request_id=str(s)) for s in range(2)])
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs], ["a", "b"],
                         step_maps=[t.step_map for t in trajs], block_size=trajs[0].block_size)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp, return_entropy=True)
    for b, t in enumerate(trajs):
        t.validate()
        assert t.token_entropy is not None and bool((t.token_entropy > 0).all())
        assert torch.allclose(t.token_entropy, est.entropy[b, :t.response_length], atol=1e-4)


def test_draw_steps_weights_match_the_objective_and_never_draw_eos_only_steps():
    steps, response = tiny_trajectory()
    for objective, weight in (("mean", 1.0), ("sum", 4.0)):
        gen = torch.Generator().manual_seed(0)
        drawn, iw = draw_steps(steps, response, EOS, gen, 64, low_discrepancy=True, objective=objective)
        assert drawn.max() <= 3 and drawn.min() >= 0
        assert torch.all(iw == weight)
        assert set(drawn.tolist()) == {0, 1, 2, 3}


def test_low_discrepancy_uniforms_take_one_per_stratum_and_are_uniform():
    gen = torch.Generator().manual_seed(1)
    k = 7
    hist = torch.zeros(k)
    for _ in range(3000):
        u = draw_uniforms(gen, k, low_discrepancy=True)
        assert sorted((u * k).floor().long().tolist()) == list(range(k))
        hist += torch.bincount((u * k).floor().long(), minlength=k)
    # each draw index k lands in each stratum equally often -> marginal uniform; here pooled counts are exact
    assert torch.all(hist == 3000)
    # the first draw alone (its marginal) is uniform: within 5 sigma of 3000 / 7 per stratum
    gen = torch.Generator().manual_seed(2)
    first = torch.stack([draw_uniforms(gen, k, True)[0] for _ in range(3000)])
    counts = torch.bincount((first * k).floor().long(), minlength=k).double()
    sigma = math.sqrt(3000 * (1 / k) * (1 - 1 / k))
    assert torch.all((counts - 3000 / k).abs() < 5 * sigma)


def _inp(policy, eos_tail: bool) -> EstimatorInput:
    g = torch.Generator().manual_seed(3)
    bs = policy.spec.block_size
    prompts = [torch.randint(10, 60, (5,), generator=g), torch.randint(10, 60, (3,), generator=g)]
    responses, maps = [], []
    for n_blocks in (2, 3):
        steps = torch.cat([torch.arange(bs) // 2 + b * (bs // 2) for b in range(n_blocks)])
        resp = torch.randint(10, 60, (n_blocks * bs,), generator=g)
        if eos_tail:
            resp[-bs // 2:] = policy.spec.eos_token_id  # the last step writes only EOS
        responses.append(resp)
        maps.append(steps)
    return EstimatorInput(prompts, responses, ["a", "b"], step_maps=maps, block_size=bs)


def test_scores_at_a_drawn_step_equal_a_naive_forward_per_step(tiny_policies):
    policy = tiny_policies["block"]
    inp = _inp(policy, eos_tail=False)
    for b in range(len(inp)):
        ref = naive_trajectory_logps(policy, inp.prompts[b], inp.responses[b], inp.step_maps[b],
                                     policy.spec.block_size)
        for t in torch.unique(inp.step_maps[b]).tolist():
            with torch.no_grad():
                logp, _, fwd = score_at_steps(policy, inp.select([b]), [torch.tensor([t, t])])
            at = inp.step_maps[b] == t
            assert fwd == 1  # a step drawn twice is scored once
            assert torch.allclose(logp[0][at], ref[at], atol=1e-5)
            assert torch.all(logp[0][~at] == 0)


def test_estimator_weights_and_seq_estimate(tiny_policies):
    policy = tiny_policies["block"]
    inp = _inp(policy, eos_tail=True)
    with torch.no_grad():
        est = sampled_steps_estimator(policy, inp, seed=5, inner_iter=0, num_samples=4)
        again = sampled_steps_estimator(policy, inp, seed=5, inner_iter=0, num_samples=4)
        other = sampled_steps_estimator(policy, inp, seed=5, inner_iter=1, num_samples=4)
    w = est.extra["token_weight"]
    assert torch.equal(est.token_logp, again.token_logp) and torch.equal(w, again.extra["token_weight"])
    assert any(not torch.equal(a, b) for a, b in zip(est.extra["drawn_steps"], other.extra["drawn_steps"]))
    for b in range(len(inp)):
        n = inp.length(b)
        last = int(inp.step_maps[b].max())
        assert torch.all(w[b, :n][inp.step_maps[b] == last] == 0)  # the EOS-only last step is never drawn
        assert abs(float(w[b, :n].sum()) - float(sum((inp.step_maps[b] == t).sum() for t in est.extra[
            "drawn_steps"][b].tolist())) / 4) < 1e-6
        assert torch.equal(est.token_mask[b, :n], w[b, :n] > 0)
    assert torch.allclose(est.seq_logp, (w * est.token_logp * est.token_mask).sum(-1))


def naive_agrpo_loss(logp, old, ref, adv, steps, drawn, iw, eps_low, eps_high, beta, groups):
    """agrpo_trainer.compute_loss, one sample and one draw at a time: for draw k the tokens unmasked at step t_k,
    -min(rho A, clip(rho) A) + beta * rho * k3, times the draw's importance weight, summed, / (K * G)."""
    total = 0.0
    for i in range(len(logp)):
        k_draws = len(drawn[i])
        for k in range(k_draws):
            for j in range(len(logp[i])):
                if steps[i][j] != drawn[i][k]:
                    continue
                rho = torch.exp(logp[i][j] - old[i][j])
                loss = -torch.min(rho * adv[i], torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv[i])
                if beta:
                    d = ref[i][j] - logp[i][j]
                    loss = loss + beta * (torch.exp(d) - d - 1) * rho
                total = total + loss * iw[i][k] / (k_draws * groups)
    return total


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_equals_naive_per_sample_reimplementation(beta):
    g = torch.Generator().manual_seed(7)
    b, length, k = 4, 6, 3
    steps = [torch.randint(0, 4, (length,), generator=g) for _ in range(b)]
    drawn = [torch.randint(0, 4, (k,), generator=g) for _ in range(b)]
    iw = [torch.rand(k, generator=g, dtype=torch.float64) + 0.5 for _ in range(b)]
    weight = torch.stack([token_weights(steps[i], drawn[i], iw[i]) for i in range(b)]).float()
    logp = (torch.randn(b, length, generator=g) * 0.3 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(b, length, generator=g) * 0.3
    ref = logp.detach() + torch.randn(b, length, generator=g) * 0.3
    adv = torch.randn(b, generator=g)
    mask = weight > 0
    config = make_loss_config("agrpo", beta=beta)
    loss, m = compute_loss("agrpo", PolicyBatch(advantages=adv, token_mask=torch.ones(b, length, dtype=torch.bool)),
                           PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref, observed_mask=mask,
                                           token_weight=weight), config)
    logp2 = logp.detach().clone().requires_grad_(True)
    naive = naive_agrpo_loss(logp2, old, ref, adv, steps, drawn, iw, 0.2, 0.2, beta, groups=b)
    assert torch.allclose(loss.double(), naive.double(), atol=1e-5)
    loss.backward()
    naive.backward()
    assert torch.allclose(logp.grad, logp2.grad.float(), atol=1e-5)
    assert float(m["clipfrac"]) > 0  # the random old log-probs do clip: the naive one agreed on which


@pytest.mark.parametrize("proposal", ["uniform", "entropy"])
def test_on_policy_first_step_ratio_one_clip_zero(tiny_model_dirs, proposal):
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["block"])
    samples = make_trajectories(policy, 4)
    g = torch.Generator().manual_seed(1)
    for s in samples:  # what a rollout with record_entropy carries
        s.trajectory.token_entropy = torch.rand(s.trajectory.response_length, generator=g) * 3
    learner = Learner(policy, LearnerConfig(algorithm="agrpo", estimator="sampled_steps", mu=1, micro_batch_size=2,
                                            temperature=0.6,
                                            estimator_params={"num_samples": 3, "proposal": proposal},
                                            optim=OptimConfig(lr=1e-4)))
    m = learner.update(samples)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0
    assert m["clipfrac"] == 0.0 and m["optimizer_steps"] == 1 and math.isfinite(m["grad_norm"])
    assert m["num_tokens"] > 0 and m["forwards"] > 0
