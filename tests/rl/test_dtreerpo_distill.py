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


def _edges(policy, rewards=None):
    trajs, n = _leaves(policy)
    leaves = [ScoredSample(t, prompt_index=i // n, sample_index=i % n,
                           reward=float(i % 3 == 0) + 0.1 * (i % 4) if rewards is None else rewards[i % n],
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


def test_schedule_holds_after_the_last_step():
    """t > T (a run longer than max_steps): lambda stays lambda_max and tau its floor, as the reference clamps."""
    config = make_loss_config("dtreerpo")
    assert distill_schedule(45000, config) == distill_schedule(30000, config)
    assert distill_schedule(45000, config)[0] == pytest.approx(3e-3, rel=1e-12)


def test_end_of_schedule_weights_that_underflow_stay_finite():
    """At t = T, tau = 1e-6: softmax(A / tau) gives some positive siblings a weight of exactly 0. Their q is 0, and
    the reference's log(q + 1e-8) keeps the term finite (0 x finite), as ours must; the value is the reference's."""
    tokens = torch.tensor([[3, 4, 5], [3, 1, 2], [0, 4, 2]])
    active = torch.ones(3, 3, dtype=torch.bool)
    groups, adv = ["a", "a", "a"], [0.9, 0.5, 0.1]
    config = make_loss_config("dtreerpo", beta=0.0)
    _, tau = distill_schedule(config.distill_total_steps, config)
    coef, log_q = distill_terms(groups, adv, list(tokens), list(active), tau)
    assert float(coef[1].abs().sum()) == 0.0 and bool(torch.isfinite(torch.stack(log_q)).all())
    logits = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    parent = {"a": torch.log_softmax(logits[0], -1)}
    logp = torch.stack([parent["a"].gather(1, tokens[k][:, None])[:, 0] for k in range(3)])
    terms = DistillTerms(torch.stack(coef), torch.stack(log_q), 1.0, float(sum(c.sum() for c in coef)))
    batch = PolicyBatch(advantages=torch.tensor(adv, dtype=torch.float64), token_mask=active, distill=terms)
    loss, metrics = compute_loss("dtreerpo", batch, PolicyEstimates(logp=logp, old_logp=logp), config)
    assert math.isfinite(loss.item())
    want = naive_self_distillation(groups, adv, tokens, active, parent, tau)
    assert float(metrics["distill_loss"]) == pytest.approx(float(want), rel=1e-6)  # its 1e-8 in W_j: module doc


def test_sibling_groups_are_one_parent_of_one_prompt(tiny_model_dirs):
    """Edges are siblings exactly when they leave the same node of the same prompt's tree (the reference's group
    key: parent node and batch index); two prompts' trees never share a group."""
    from rollout.models.loading import load_policy

    edges = _edges(load_policy(tiny_model_dirs["llada"]))
    prompts = {e.prompt_index for e in edges}
    assert len(prompts) == 2
    for a in edges:
        node_a = a.trajectory.request_id.rsplit("-node", 1)[1].split(".")
        for b in edges:
            node_b = b.trajectory.request_id.rsplit("-node", 1)[1].split(".")
            same = a.prompt_index == b.prompt_index and node_a[:-1] == node_b[:-1]
            assert (a.sibling_group == b.sibling_group) == same, (a.trajectory.request_id, b.trajectory.request_id)


@pytest.mark.parametrize("ranks", [1, 2])
def test_learner_distillation_value_is_the_reference_loop(tiny_model_dirs, ranks):
    """Through the learner, on-policy (first inner step): its distill_loss equals the reference's loop over the
    groups, with each sibling's log-prob of its token under the parent state (the learner's old pass) as
    log p(u | parent); two siblings that chose the same token read the same log-prob (they share the parent).
    ranks 2: two data-parallel ranks holding the same batch, simulated (sums over ranks double, gradients are
    averaged): each rank's term is still the mean over its pairs."""
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["llada"])
    edges = _edges(policy, rewards=[1.0, 0.8, 0.1, 0.9, 0.2, 0.75])  # two positive siblings under each root child
    learner = Learner(policy, LearnerConfig(
        algorithm="dtreerpo", estimator="intermediate_state", mu=1, micro_batch_size=64, shuffle=False,
        reference_model=False, optim=OptimConfig(lr=1e-6),
        loss={"beta": 0.0, "distill_lambda_max": 1.0, "distill_total_steps": 10}))
    learner.optimizer_steps = 5
    if ranks > 1:
        learner.backend.all_reduce_sum = lambda t: t * ranks
        learner.backend.grad_average = ranks
    m = learner.update(edges)
    keys = {key for key, _ in learner._old}
    assert len(keys) == 1 and len(learner._old) == len(edges)
    key = keys.pop()
    old = [learner._old[(key, i)] for i in range(len(edges))]
    groups = [e.sibling_group for e in edges]
    adv = [float(e.advantage) for e in edges]
    tokens = torch.stack([e.trajectory.response_ids for e in edges])
    active = torch.stack([o.counted.cpu() for o in old])
    assert bool(active.any()) and not bool(active.all())
    # some (group, position) pairs merge two positive siblings (W_j, q_j over more than one edge)
    shared = [(g, j) for g in set(groups) for j in range(tokens.shape[1])
              if sum(1 for k in range(len(edges)) if groups[k] == g and adv[k] > 0 and active[k, j]) > 1]
    assert len(shared) > 10
    vocab = int(tokens.max()) + 1
    parent = {g: torch.full((tokens.shape[1], vocab), float("nan"), dtype=torch.float64) for g in set(groups)}
    for k, g in enumerate(groups):
        for j in torch.nonzero(active[k])[:, 0].tolist():
            lp, u = float(old[k].token_logp[j]), int(tokens[k, j])
            if not math.isnan(parent[g][j, u]):
                assert lp == pytest.approx(float(parent[g][j, u]), abs=1e-5)
            parent[g][j, u] = lp
    _, tau = distill_schedule(5, learner.loss_config)
    want = naive_self_distillation(groups, adv, tokens, active, parent, tau)
    assert m["distill_loss"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("override,field", [("algorithm.distill_gamma=0", "algorithm.distill_gamma"),
                                            ("algorithm.distill_beta=-0.5", "algorithm.distill_beta"),
                                            ("algorithm.distill_tau_max=0", "algorithm.distill_tau_max"),
                                            ("algorithm.distill_lambda_max=-1", "algorithm.distill_lambda_max"),
                                            ("algorithm.distill_total_steps=0", "algorithm.distill_total_steps")])
def test_recipe_schedule_values_out_of_range_are_one_line_errors(override, field):
    """Values whose schedule cannot be computed (gamma 0: lambda's 0/0; beta < 0: 0 to a negative power at t = T)
    are refused when the recipe loads, naming the field, not at the first optimizer step."""
    from pathlib import Path

    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    root = Path(__file__).resolve().parents[2] / "recipes"
    with pytest.raises(RecipeError) as err:
        load_recipe(root / "tiny-dtreerpo.yaml", overrides=[override])
    assert field in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="distill_gamma != 0, distill_beta >= 0"):
        make_loss_config("dtreerpo", **{override.split("=")[0].split(".")[1]: float(override.split("=")[1])})
    assert distill_schedule(10**6, make_loss_config("dtreerpo", distill_gamma=-1.5))[0] == pytest.approx(3e-3)
