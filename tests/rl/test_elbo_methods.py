"""ESPO, BGPO, EBPO (issue 15): each loss against a naive per-sample re-implementation of the paper's equations,
their estimators against exact enumeration, the on-policy first step (ratio 1, clip fraction 0), and BGPO's
per-draw backward (the accumulated gradient equals the whole bound's, at constant memory)."""
from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch

from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.estimators.exact import exact_elbo
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy
from rollout.trajectory import Trajectory


# ----------------------------------------------------------------------------------------------- naive losses
def _random_seq_case(b=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = (-20 + 4 * torch.randn(b, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = seq.detach() + 3 * torch.randn(b, generator=g, dtype=torch.float64)  # far enough off-policy to clip
    ref = seq.detach() + torch.randn(b, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return seq, old, ref, adv, lengths, mask


def test_espo_loss_equals_the_papers_equations_per_sample():
    seq, old, ref, adv, lengths, mask = _random_seq_case()
    values = seq.detach()
    cfg = make_loss_config("espo")
    assert (cfg.clip_eps_low, cfg.beta, cfg.kl_estimator, cfg.token_set) == (0.2, 1e-3, "k2", "response")
    batch = PolicyBatch(advantages=adv, token_mask=mask, lengths=torch.full_like(lengths, mask.shape[1]))
    loss, m = compute_loss("espo", batch, PolicyEstimates(seq_logp=seq, seq_old_logp=old, seq_ref_logp=ref), cfg)
    # naive: rho = exp((ELBO - ELBO_old) / L), -min(rho A, clip(rho) A) + beta 0.5 (ELBO - ELBO_ref)^2 / L, mean
    length, naive, clipped = mask.shape[1], 0.0, 0
    for i in range(len(seq)):
        rho = math.exp((float(values[i]) - float(old[i])) / length)
        a = float(adv[i])
        naive += -min(rho * a, min(max(rho, 0.8), 1.2) * a) + 1e-3 * 0.5 * (float(values[i]) - float(ref[i])) ** 2 / length
        clipped += (a > 0 and rho > 1.2) or (a < 0 and rho < 0.8)
    assert loss.item() == pytest.approx(naive / len(seq), rel=1e-12)
    assert float(m["clipfrac"]) == pytest.approx(clipped / len(seq)) and 0 < clipped < len(seq)
    # gradient: d/dELBO_i = -(A_i rho_i / L) [unclipped] + beta (ELBO_i - ELBO_ref_i) / L, / B
    loss.backward()
    for i in range(len(seq)):
        rho = math.exp((float(values[i]) - float(old[i])) / length)
        a = float(adv[i])
        active = not ((a > 0 and rho > 1.2) or (a < 0 and rho < 0.8))
        expect = (-(a * rho / length) * active + 1e-3 * (float(values[i]) - float(ref[i])) / length) / len(seq)
        assert float(seq.grad[i]) == pytest.approx(expect, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", ["espo", "ebpo"])
def test_sequence_clip_sides_are_not_swapped(name):
    # asymmetric clip (eps_low 0.1, eps_high 0.5): a swap of the two sides changes which samples clip
    seq, old, _, adv, lengths, mask = _random_seq_case(b=12, seed=3)
    cfg = make_loss_config(name, clip_eps_low=0.1, clip_eps_high=0.5, beta=0.0)
    batch = PolicyBatch(advantages=adv, token_mask=mask, lengths=torch.full_like(lengths, mask.shape[1]))
    loss, _ = compute_loss(name, batch, PolicyEstimates(seq_logp=seq, seq_old_logp=old), cfg)
    length = mask.shape[1] if name == "espo" else 1  # ESPO per-token normalised, EBPO's ratio as the paper writes it
    naive, swapped = 0.0, 0.0
    for i in range(len(seq)):
        rho, a = math.exp((float(seq[i]) - float(old[i])) / length), float(adv[i])
        naive += -min(rho * a, min(max(rho, 0.9), 1.5) * a)
        swapped += -min(rho * a, min(max(rho, 0.5), 1.1) * a)
    assert loss.item() == pytest.approx(naive / len(seq), rel=1e-12)
    assert abs(naive - swapped) / len(seq) > 1e-3  # the case tells the two sides apart


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_ebpo_loss_equals_the_papers_equations_per_sample(eps_low, eps_high):
    """LLaDA2.1 tech report (inclusionAI/LLaDA2.X @ a798329, llada2_1_tech_report.pdf, Sec. 3.2), written per
    sample: Eq. (4) J = E[min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)] with Eq. (5)
    log r(y|x) = sum_n w_n sum_b (log p_theta(y^b | z_n, x; M) - log p_old(y^b | z_n, x; M)), z_n = y_tn (+) y_0
    the block-causal composite input; here the block terms are random numbers, one per (timestep n, block b)."""
    g = torch.Generator().manual_seed(1)
    b, steps, blocks = 5, 3, 4
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    cur = -2 * torch.rand(b, steps, blocks, generator=g, dtype=torch.float64)
    old = cur + 0.2 * torch.randn(b, steps, blocks, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, 8, dtype=torch.bool)
    seq = (w[None, :, None] * cur).sum((1, 2))
    seq_old = (w[None, :, None] * old).sum((1, 2))
    loss, m = compute_loss("ebpo", PolicyBatch(advantages=adv, token_mask=mask),
                           PolicyEstimates(seq_logp=seq, seq_old_logp=seq_old),
                           make_loss_config("ebpo", clip_eps_low=eps_low, clip_eps_high=eps_high))
    naive = 0.0
    for i in range(b):
        log_rho = sum(float(w[n]) * (float(cur[i, n, k]) - float(old[i, n, k])) for n in range(steps) for k in range(blocks))
        rho, a = math.exp(log_rho), float(adv[i])
        naive += -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
    assert loss.item() == pytest.approx(naive / b, rel=1e-12)
    assert float(m["clipfrac"]) > 0  # the case reaches the clip (the comparison covers it)


def _random_draw_case(b=5, k=4, length=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    mc_logp = (-3 * torch.rand(b, k, length, generator=g, dtype=torch.float64)).requires_grad_(True)
    weights = torch.rand(b, k, length, generator=g, dtype=torch.float64) * (torch.rand(b, k, length, generator=g) < 0.6)
    weights = weights / k
    mask = torch.arange(length)[None, :] < torch.tensor([6, 5, 4, 6, 3])[:b, None]
    old_logp = mc_logp.detach() + 0.3 * torch.randn(b, k, length, generator=g, dtype=torch.float64)
    old = (weights * old_logp * mask[:, None, :]).sum(-1)
    adv = torch.tensor([1.0, -0.5, 0.7, -2.0, 0.3], dtype=torch.float64)[:b]
    return mc_logp, weights, mask, old, adv


def _naive_bgpo(mc_logp, weights, mask, old, adv):
    b, k, length = mc_logp.shape
    total = 0.0
    for i in range(b):
        bound = 0.0
        for j in range(k):  # ell_k: the k-th draw's own ELBO estimate (weights carry 1/K)
            ell = sum(k * weights[i, j, t] * mc_logp[i, j, t] for t in range(length) if mask[i, t])
            ell_old = k * old[i, j]
            delta = ell - ell_old
            bound = bound + (adv[i] * (1 + delta) if adv[i] > 0 else adv[i] * torch.exp(delta)) / k
        total = total - bound
    return total / b


def test_bgpo_loss_equals_the_papers_bound_per_sample_and_is_a_lower_bound():
    mc_logp, weights, mask, old, adv = _random_draw_case()
    est = PolicyEstimates(mc_logp=mc_logp, mc_weights=weights, mc_old_elbo=old)
    loss, _ = compute_loss("bgpo", PolicyBatch(advantages=adv, token_mask=mask), est)
    naive = _naive_bgpo(mc_logp, weights, mask, old, adv)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-12)
    grad = torch.autograd.grad(loss, mc_logp)[0]
    naive_grad = torch.autograd.grad(_naive_bgpo(mc_logp, weights, mask, old, adv), mc_logp)[0]
    torch.testing.assert_close(grad, naive_grad, rtol=1e-10, atol=1e-14)
    # a lower bound of the ELBO objective A exp(mean_k delta_k) for every sample (loss = -bound >= -objective)
    k = mc_logp.shape[1]
    delta = k * ((weights * mc_logp * mask[:, None, :]).sum(-1) - old)
    objective = -(adv * torch.exp(delta.mean(1))).mean()
    assert loss.item() >= objective.item()
    # linear in the draws: the sum of one-draw losses (mc_draws = K) is the whole loss
    parts = sum(compute_loss("bgpo", PolicyBatch(advantages=adv, token_mask=mask), PolicyEstimates(
        mc_logp=mc_logp[:, j:j + 1], mc_weights=weights[:, j:j + 1], mc_old_elbo=old[:, j:j + 1], mc_draws=k))[0]
        for j in range(k))
    assert parts.item() == pytest.approx(loss.item(), rel=1e-12)


def test_bgpo_equals_the_elbo_objective_in_value_and_gradient_on_policy():
    mc_logp, weights, mask, _, adv = _random_draw_case(seed=3)
    on_policy = (weights * mc_logp.detach() * mask[:, None, :]).sum(-1)
    loss, m = compute_loss("bgpo", PolicyBatch(advantages=adv, token_mask=mask),
                           PolicyEstimates(mc_logp=mc_logp, mc_weights=weights, mc_old_elbo=on_policy))
    k = mc_logp.shape[1]
    delta = k * ((weights * mc_logp * mask[:, None, :]).sum(-1) - on_policy)
    objective = -(adv * torch.exp(delta.mean(1))).mean()
    assert loss.item() == pytest.approx(objective.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, mc_logp)[0], torch.autograd.grad(objective, mc_logp)[0],
                               rtol=1e-10, atol=1e-14)
    assert float(m["ratio_mean"]) == 1.0 and float(m["clipfrac"]) == 0.0


# ----------------------------------------------------------------------------------------------- estimators
N_DRAWS = 400


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """Tiny models with scaled weights, so that log-probs depend strongly on the mask (non-vacuous comparisons)."""
    root = tmp_path_factory.mktemp("sharp_elbo")
    out = {}
    for name, kind, block in (("llada", "llada", None), ("block", "block", 3)):
        policy = load_policy(make_tiny_policy(kind, root / name, seed=5, hidden_size=32, num_layers=2, num_heads=2,
                                              num_kv_heads=1, intermediate_size=64, block_size=block))
        with torch.no_grad():
            for pname, p in policy.model.named_parameters():
                if "norm" not in pname:
                    p.mul_(6.0)
        out[name] = policy
    return out


def _case(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 60, (4,), generator=g), torch.randint(10, 60, (length,), generator=g)


def _many(prompt, response, n=N_DRAWS):
    return EstimatorInput([prompt] * n, [response] * n, [f"draw{i}" for i in range(n)])


def _mean_se(values):
    values = values.double()
    return float(values.mean()), float(values.std() / np.sqrt(values.numel()))


@pytest.mark.parametrize("coupled", [True, False])
def test_espo_estimator_is_unbiased_for_the_exact_elbo(sharp, coupled):
    policy = sharp["llada"]
    prompt, response = _case(5, seed=1)
    exact = exact_elbo(policy, prompt, response)
    with torch.no_grad():
        est = get_estimator("espo")(policy, _many(prompt, response), seed=3, num_samples=1, coupled=coupled)
    mean, se = _mean_se(est.seq_logp)
    assert abs(mean - exact) < 3 * se, (mean, se, exact)
    # L / x instead of (L + 1) / x would be off by a factor 6/5: far outside the noise
    assert abs(exact) / 5 > 6 * se


def test_espo_draw_masks_each_token_in_exactly_one_view():
    from rl.masking import draw_masks

    for draw in draw_masks("espo", [7] * 50, [f"k{i}" for i in range(50)], base_seed=0, num_samples=2):
        for k in range(0, draw.num_forwards - 1):
            pair = draw.masks[k] ^ draw.masks[k + 1]
            if bool(pair.all()) and not bool((draw.masks[k] & draw.masks[k + 1]).any()):
                break  # at least one complementary pair
        else:
            pytest.fail("no complementary pair of views")
        # each token's weights over one coupled draw: (L+1)/x / 2 and (L+1)/(L-x) / 2, / K
        assert bool((draw.token_weights[draw.masks] > 0).all()) and bool((draw.token_weights[~draw.masks] == 0).all())


def test_ebpo_block_elbo_with_shared_timesteps_is_unbiased(sharp):
    policy = sharp["block"]
    prompt, response = _case(6, seed=2)
    exact = exact_elbo(policy, prompt, response)
    with torch.no_grad():
        est = get_estimator("block_elbo")(policy, _many(prompt, response), seed=4, num_samples=2, share_t=True)
    mean, se = _mean_se(est.seq_logp)
    assert abs(mean - exact) < 3 * se, (mean, se, exact)
    assert est.forwards == 2  # every block in each timestep's single pass


# ----------------------------------------------------------------------------------------------- learner
def _samples(policy, n=4, length=8, seed=0, advantages=None):
    g = torch.Generator().manual_seed(seed)
    block = policy.spec.block_size or 4
    out = []
    for i in range(n):
        resp = torch.randint(10, 90, (length,), generator=g)
        traj = Trajectory(prompt_ids=torch.randint(10, 90, (4 + i % 3,), generator=g), response_ids=resp,
                          step_map=torch.arange(length) // 2, logprobs=torch.zeros(length),
                          confidence=torch.zeros(length), valid_length=length - (i % 3), nfe=4, finish_reason="eos",
                          block_size=block, request_id=f"s{i}")
        adv = (1.0 if i % 2 else -1.0) if advantages is None else advantages[i]
        out.append(ScoredSample(traj, advantage=adv, reward=float(i % 2)))
    return out


@pytest.mark.parametrize("algorithm,estimator,kind,params", [
    ("espo", "espo", "llada", {"num_samples": 2}),
    ("bgpo", "mc_elbo", "llada", {"num_samples": 3}),
    ("ebpo", "block_elbo", "block", {"num_samples": 2, "share_t": True}),
])
def test_on_policy_first_inner_step_ratio_one_clip_zero(tiny_model_dirs, algorithm, estimator, kind, params):
    policy = load_policy(tiny_model_dirs[kind])
    learner = Learner(policy, LearnerConfig(algorithm=algorithm, estimator=estimator, estimator_params=params, mu=1,
                                            micro_batch_size=2, optim=OptimConfig(lr=1e-4)))
    m = learner.update(_samples(policy))
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0
    assert m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0
    if algorithm == "espo":
        assert m["kl"] == 0.0 and m["forwards_ref"] > 0  # beta 1e-3 against a frozen reference
    assert m["optimizer_steps"] == 1 and m["nan_skipped"] == 0 and math.isfinite(m["grad_norm"])
    assert m["grad_norm"] > 0


class _LiveSaved:
    """Bytes of autograd-saved tensors alive now and at peak (a pack hook wraps each one; freed with its graph)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        size = t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        holder = _Holder(t)
        weakref.finalize(holder, self._free, size)
        return holder

    def _free(self, size):
        self.live -= size

    @staticmethod
    def unpack(h):
        return h.t


class _Holder:
    def __init__(self, t):
        self.t = t


def _bgpo_update(path, per_draw, draws):
    policy = load_policy(path)
    w0 = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    cfg = LearnerConfig(algorithm="bgpo", estimator="mc_elbo", estimator_params={"num_samples": draws},
                        loss={"per_draw_backward": per_draw}, mu=1, micro_batch_size=4, grad_clip=None,
                        shuffle=False, optim=OptimConfig(lr=1e4, eps=1e4))  # first step ~ lr/eps * gradient
    learner = Learner(policy, cfg)
    meter = _LiveSaved()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        m = learner.update(_samples(policy, advantages=[1.0, -1.0, 0.5, -0.3]))
    delta = {k: v - w0[k] for k, v in policy.model.state_dict().items()}
    return delta, m, meter.peak


def test_bgpo_per_draw_backward_equals_the_whole_bound_at_constant_memory(tiny_model_dirs):
    path = tiny_model_dirs["llada"]
    joint, m_joint, peak_joint = _bgpo_update(path, per_draw=False, draws=6)
    split, m_split, peak_split = _bgpo_update(path, per_draw=True, draws=6)
    # per draw: old pass + training pass, 6 draws each; all draws at once on-policy: pi_old from the training pass
    assert m_split["forwards"] == 2 * 6 and m_joint["forwards"] == 6
    assert m_split["loss"] == pytest.approx(m_joint["loss"], rel=1e-5)
    biggest = max(float(d.abs().max()) for d in joint.values())
    assert biggest > 1e-4  # the update did something
    for k, d in joint.items():  # float32 sums in another order: agree to 1e-5 of the largest step
        torch.testing.assert_close(split[k], d, rtol=1e-4, atol=1e-5 * biggest)
    _, _, peak_split_2 = _bgpo_update(path, per_draw=True, draws=2)
    _, _, peak_joint_2 = _bgpo_update(path, per_draw=False, draws=2)
    # one draw's graph at a time: the peak does not grow with the number of draws; all at once it grows ~K
    # (equal up to the draw-dependent number of masked positions the scorer gathers: well under 1%)
    assert peak_split == pytest.approx(peak_split_2, rel=0.01)
    assert peak_joint > 2.5 * peak_joint_2 and peak_joint > 4 * peak_split


def test_per_draw_estimates_add_up_to_the_whole_estimate(tiny_policies):
    """draw_index scores one forward of each sample with its weights unchanged: the draws' estimates add up to the
    full estimate (what makes BGPO's per-draw losses add up to the whole bound)."""
    policy = tiny_policies["llada"]
    inp = EstimatorInput(*map(list, zip(*[_case(6, s) for s in range(3)])), ["a", "b", "c"])
    estimator = get_estimator("mc_elbo")
    with torch.no_grad():
        whole = estimator(policy, inp, seed=1, num_samples=3)
        parts = [estimator(policy, inp, seed=1, num_samples=3, draw_index=k) for k in range(3)]
    assert whole.extra["num_draws"] == 3 and all(p.extra["num_draws"] == 3 and p.forwards == 1 for p in parts)
    torch.testing.assert_close(sum(p.seq_logp for p in parts), whole.seq_logp, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="draw_index 3 outside"):
        estimator(policy, inp, seed=1, num_samples=3, draw_index=3)
