"""d-TreeRPO's time-scheduled self-distillation (THU-BPM/d-TreeRPO dtreerpo_trainer.compute_loss @3eb6f21,
enable_self_distillation_loss): against a literal per-group, per-position re-implementation over the parent
state's full vocabulary distribution (values and gradients), its schedule, and through the learner (siblings split
over micro-batches give the whole-batch update)."""
from __future__ import annotations

import math

import pytest
import torch

from launch.driver_tree import tree_samples
from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.algorithms.dtreerpo import DistillTerms, distill_schedule, distill_terms
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from tests.rl.test_dtreerpo import TREE, _leaves


def naive_self_distillation(groups, adv, tokens, active, parent_logp, tau, eps=1e-8):
    """The reference's loop: per sibling group of > 1 edges, w = softmax(A / tau) over its positive edges; per
    position j with an active positive edge, q_j over the distinct tokens they chose (weights summed, / (sum + eps)),
    KL_j = sum_u q_u (log(q_u + eps) - log p(u | parent)_j); the mean over all (group, position) pairs."""
    total, count = 0.0, 0
    for g in sorted(set(groups)):
        idx = [k for k, h in enumerate(groups) if h == g]
        if len(idx) <= 1:
            continue
        pos = [k for k in idx if adv[k] > 0]
        if not pos:
            continue
        w = torch.softmax(torch.tensor([adv[k] for k in pos], dtype=torch.float64) / tau, dim=0)
        for j in range(tokens.shape[1]):
            weights: dict[int, float] = {}
            for r, k in enumerate(pos):
                if active[k][j]:
                    u = int(tokens[k, j])
                    weights[u] = weights.get(u, 0.0) + float(w[r])
            if not weights:
                continue
            s = sum(weights.values())
            kl = 0.0
            for u, wu in weights.items():
                q = wu / (s + eps)
                kl = kl + q * (math.log(q + eps) - parent_logp[g][j, u])
            total, count = total + kl, count + 1
    return total / count


def test_distillation_equals_the_reference_loop_in_value_and_gradient():
    gen = torch.Generator().manual_seed(4)
    b, length, vocab = 9, 6, 5  # a small vocabulary: siblings often choose the same token (q merges them)
    groups = ["a", "a", "a", "a", "b", "b", "b", "c", "d"]  # c: a lone edge (skipped); d: the same
    adv = [0.7, -0.2, 0.3, 0.05, -0.4, -0.1, 0.0, 0.9, 0.5]  # b: no positive sibling (skipped)
    tokens = torch.randint(0, vocab, (b, length), generator=gen)
    active = torch.rand(b, length, generator=gen) < 0.6
    logits = torch.randn(4, length, vocab, generator=gen, dtype=torch.float64).requires_grad_()
    gi = {"a": 0, "b": 1, "c": 2, "d": 3}
    tau = 0.8
    parent_logp = {g: torch.log_softmax(logits[gi[g]], -1) for g in gi}
    want = naive_self_distillation(groups, adv, tokens, active, parent_logp, tau)
    (want_grad,) = torch.autograd.grad(want, logits, retain_graph=True)

    # ours: each edge's own token log-probs under the parent state, as the intermediate-state estimator gives them
    logp = torch.stack([parent_logp[groups[k]].gather(1, tokens[k][:, None])[:, 0] for k in range(b)])
    coef, log_q = distill_terms(groups, adv, list(tokens), list(active), tau)
    norm = float(sum(c.sum() for c in coef))
    config = make_loss_config("dtreerpo", beta=0.0)

    def loss_with(lam):
        terms = DistillTerms(torch.stack(coef), torch.stack(log_q), lam, norm)
        batch = PolicyBatch(advantages=torch.tensor(adv, dtype=torch.float64), token_mask=active, distill=terms)
        return compute_loss("dtreerpo", batch, PolicyEstimates(logp=logp, old_logp=logp.detach()), config)

    with_sd, metrics = loss_with(1.0)
    without, _ = loss_with(0.0)
    got = with_sd - without
    # the reference's 1e-8 in q's denominator is left out (module doc): agreement to 1e-6 relative
    assert float(metrics["distill_loss"]) == pytest.approx(want.item(), rel=1e-6)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert torch.allclose(got_grad, want_grad, rtol=1e-6, atol=1e-9)
    # the pairs: one per (group, position) with a positive active sibling, c summing to 1 there (up to eps)
    pairs = sum(int((active[[k for k in range(b) if groups[k] == g and adv[k] > 0]].any(0)).sum()) for g in "a")
    assert norm == pytest.approx(pairs, rel=1e-12)
    for k in (4, 5, 6, 7, 8):  # no weight outside the groups that count
        assert float(coef[k].abs().sum()) == 0.0


def test_schedule_is_the_reference_formulas():
    config = make_loss_config("dtreerpo")
    assert (config.distill_lambda_max, config.distill_gamma, config.distill_tau_max, config.distill_beta,
            config.distill_total_steps) == (3e-3, 2.0, 2.0, 0.7, 30000)  # dtreerpo.yaml
    assert distill_schedule(0, config) == (0.0, 2.0)
    lam, tau = distill_schedule(30000, config)
    assert lam == pytest.approx(3e-3) and tau == 1e-6
    lam, tau = distill_schedule(7500, config)
    assert lam == pytest.approx(3e-3 * (math.exp(0.5) - 1) / (math.exp(2) - 1))
    assert tau == pytest.approx(2.0 * 0.75 ** 0.7)


def _edges(policy):
    trajs, n = _leaves(policy)
    leaves = [ScoredSample(t, prompt_index=i // n, sample_index=i % n, reward=float(i % 3 == 0) + 0.1 * (i % 4),
                           keep=True) for i, t in enumerate(trajs)]
    return tree_samples(leaves, TREE)


def test_learner_update_is_the_same_with_siblings_split_over_micro_batches(tiny_model_dirs):
    """The term is linear in the edges' log-probs with weights from the whole batch, so micro-batches of one edge
    give the whole-batch update; turning the term off changes it (lambda(t) > 0 at optimizer step 5 of 10)."""
    from rollout.models.loading import load_policy

    def update(micro, lam_max):
        policy = load_policy(tiny_model_dirs["llada"])
        w0 = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
        edges = _edges(policy)
        groups = [e.sibling_group for e in edges]
        assert all(g is not None for g in groups) and len(set(groups)) < len(groups)
        learner = Learner(policy, LearnerConfig(
            algorithm="dtreerpo", estimator="intermediate_state", mu=1, micro_batch_size=micro, shuffle=False,
            reference_model=False, grad_clip=None, optim=OptimConfig(lr=1e4, eps=1e4),  # step ~ the gradient
            loss={"beta": 0.0, "distill_lambda_max": lam_max, "distill_total_steps": 10}))
        learner.optimizer_steps = 5  # t = 5 of T = 10: lambda(t) > 0
        m = learner.update(edges)
        return {k: v.detach() - w0[k] for k, v in policy.model.state_dict().items()}, m, len(edges)

    whole, m, n = update(64, 1.0)
    split, _, _ = update(1, 1.0)
    off, m_off, _ = update(64, 0.0)
    assert m["distill_lambda"] == pytest.approx((math.exp(1) - 1) / (math.exp(2) - 1))
    assert m["distill_loss"] > 0 and "distill_loss" not in m_off
    assert m["ratio_mean"] == 1.0 and m["clipfrac"] == 0.0
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=0, atol=1e-6, msg=k)
    assert max(float((whole[k] - off[k]).abs().max()) for k in whole) > 1e-4  # the term moves the weights
