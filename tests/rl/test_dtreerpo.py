"""d-TreeRPO: tree branches share their prefix exactly, each leaf is a valid trajectory whose log-probs recompute,
node values and local advantages against a naive recursion over the tree, the edge transitions, the loss against a
per-sample re-implementation of dtreerpo_trainer.compute_loss, and the first on-policy inner step."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from launch.driver_tree import edge_samples, tree_samples, with_tree_branches
from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators.base import EstimatorInput
from rl.estimators.trajectory import trajectory_estimator
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rl.tree import TreeShape, local_advantages, node_values, transition_codes
from rollout.engine import TorchEngine
from rollout.sampling import GenerationRequest, SamplingParams

TREE = SimpleNamespace(name="dtreerpo", num_tree_samples=2, tree_branch_factor=3, tree_contraction_factor=2)


def test_tree_shape_follows_the_reference_branch_points():
    assert TreeShape(128, 2, 4, 4).branch_steps() == [64]
    assert TreeShape(128, 4, 4, 4).branch_steps() == [32, 64, 96]
    assert TreeShape(10, 3, 2, 2).branch_steps() == [3, 6]  # int(k T / s) as the reference
    shape = TreeShape(8, 2, 2, 3)
    assert shape.num_leaves == 6 and shape.leaves() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert TreeShape(8, 1, 5, 3).leaves() == [(i,) for i in range(5)] and TreeShape(8, 1, 5, 3).branch_steps() == []


def _leaves(policy, temperature=0.9, kv_cache="none"):
    params = SamplingParams(temperature=temperature, max_tokens=2 * policy.spec.block_size, steps_per_block=4,
                            remasking="low_confidence_static", stop_at_eos=False)
    prompts = [torch.tensor([12, 13, 14]), torch.tensor([20, 21, 22, 23, 24])]
    n = 6
    requests = [GenerationRequest(p, params, seed=100 + k, request_id=f"d{k}-p{k}-s{j}")
                for k, p in enumerate(prompts) for j in range(n)]
    requests = with_tree_branches(requests, TREE, n, params, policy.spec.block_size)
    return TorchEngine(policy, kv_cache=kv_cache).generate(requests), n


@pytest.mark.parametrize("kind,cache", [("llada", "none"), ("block", "block")])
def test_branches_share_their_prefix_exactly_and_diverge_after(tiny_policies, kind, cache):
    policy = tiny_policies[kind]
    trajs, n = _leaves(policy, kv_cache=cache)
    branch = 4  # T = 4 steps x 2 blocks, two levels: branch at step 4
    mask_id = policy.spec.mask_token_id
    paths = TreeShape(8, 2, 2, 3).leaves()
    for tree in range(2):
        leaves = trajs[tree * n:(tree + 1) * n]
        for a in range(n):
            for b in range(a + 1, n):
                ta, tb = leaves[a], leaves[b]
                before = ta.step_map < branch
                if paths[a][0] == paths[b][0]:  # same root child: the prefix is the same decode
                    assert torch.equal(before, tb.step_map < branch)
                    assert torch.equal(ta.response_ids[before], tb.response_ids[before])
                    assert torch.equal(ta.logprobs[before], tb.logprobs[before])
                    assert torch.equal(ta.state_before_step(branch, mask_id), tb.state_before_step(branch, mask_id))
                    assert not torch.equal(ta.response_ids, tb.response_ids)  # then they branch
                else:
                    assert not torch.equal(ta.state_before_step(branch, mask_id), tb.state_before_step(branch, mask_id))


def test_each_leaf_is_a_valid_trajectory_whose_logprobs_recompute(tiny_policies):
    policy = tiny_policies["llada"]
    trajs, _ = _leaves(policy, temperature=1.0)
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], step_maps=[t.step_map for t in trajs],
                         block_size=trajs[0].block_size)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp)
    for b, t in enumerate(trajs):
        t.validate()
        assert t.num_steps == 8 and t.sampling["branch_seeds"]
        assert torch.allclose(est.token_logp[b, :t.response_length], t.logprobs, atol=1e-5)


def naive_tree_advantages(rewards: dict) -> tuple[dict, dict]:
    """Recursive: a node's value is its reward (leaf) or the mean of its children's; advantage = value - mean of
    the other children of its parent."""
    def value(path):
        if path in rewards:
            return rewards[path]
        kids = sorted({p[:len(path) + 1] for p in rewards if p[:len(path)] == path})
        return sum(value(k) for k in kids) / len(kids)

    nodes = {p[:k] for p in rewards for k in range(len(p) + 1)}
    values = {p: value(p) for p in nodes}
    adv = {}
    for p in nodes - {()}:
        sib = [values[q] for q in nodes if len(q) == len(p) and q[:-1] == p[:-1] and q != p]
        adv[p] = values[p] - sum(sib) / len(sib) if sib else 0.0
    return values, adv


@pytest.mark.parametrize("shape", [TreeShape(8, 2, 4, 4), TreeShape(9, 3, 2, 3), TreeShape(8, 2, 3, 1)])
def test_values_and_local_advantages_equal_a_naive_recursion(shape):
    g = torch.Generator().manual_seed(shape.num_leaves)
    rewards = {p: float(torch.rand(1, generator=g)) for p in shape.leaves()}
    del rewards[shape.leaves()[-1]]  # a failed leaf: its parent averages the rest
    values, adv = node_values(rewards), local_advantages(node_values(rewards))
    want_values, want_adv = naive_tree_advantages(rewards)
    assert values.keys() == want_values.keys() and adv.keys() == want_adv.keys()
    for p in want_values:
        assert math.isclose(values[p], want_values[p], abs_tol=1e-12)
    for p in want_adv:
        assert math.isclose(adv[p], want_adv[p], abs_tol=1e-12)


def test_transition_codes_train_what_the_edge_unmasked_through_the_first_eos():
    m, eos = 2, 1
    parent = torch.tensor([10, m, m, m, m, m])
    child = torch.tensor([10, 11, m, eos, 12, m])
    assert transition_codes(parent, child, m, eos).tolist() == [0, 1, 2, 1, 2, 2]
    assert transition_codes(parent, child, m, None).tolist() == [0, 1, 2, 1, 1, 2]


def test_edge_samples_encode_parent_and_child_states(tiny_policies):
    policy = tiny_policies["llada"]
    trajs, n = _leaves(policy)
    leaves = [ScoredSample(t, prompt_index=0, sample_index=j, reward=float(j % 2), keep=True)
              for j, t in enumerate(trajs[:n])]
    edges = edge_samples(leaves, TREE)
    mask_id = policy.spec.mask_token_id
    by_node = {e.request_id.rsplit("-node", 1)[1]: e for e in edges}
    assert set(by_node) <= {"0", "1", *(f"{c}.{g}" for c in range(2) for g in range(3))}
    for node, e in by_node.items():
        e.trajectory.validate()
        path = tuple(int(x) for x in node.split("."))
        leaf = leaves[path[0] * 3 + (path[1] if len(path) > 1 else 0)].trajectory
        if len(path) == 2:  # leaf edge: child = the leaf, parent = its state at the branch step
            assert torch.equal(e.trajectory.response_ids, leaf.response_ids)
            parent = leaf.state_before_step(4, mask_id)
        else:
            assert torch.equal(e.trajectory.response_ids, leaf.state_before_step(4, mask_id))
            parent = torch.full_like(leaf.response_ids, mask_id)
        assert torch.equal(e.trajectory.step_map, transition_codes(parent, e.trajectory.response_ids, mask_id,
                                                                   policy.spec.eos_token_id))
    _, adv = naive_tree_advantages({(j // 3, j % 3): float(j % 2) for j in range(n)})
    for node, e in by_node.items():
        assert math.isclose(e.advantage, adv[tuple(int(x) for x in node.split("."))], abs_tol=1e-12)
    assert len(tree_samples(leaves, TREE)) == len(edges)


def naive_dtreerpo_loss(logp, old, ref, active, adv, eps, beta):
    """dtreerpo_trainer.compute_loss: per edge the active tokens' -min(rho A, clip(rho) A) summed / their count,
    mean over edges; plus beta times the same mean of k3 = exp(ref - logp) - (ref - logp) - 1."""
    pg, kl = 0.0, 0.0
    for b in range(len(logp)):
        n = max(int(active[b].sum()), 1)
        rho = torch.exp(logp[b] - old[b])
        obj = torch.min(rho * adv[b], torch.clamp(rho, 1 - eps, 1 + eps) * adv[b])
        pg = pg - (obj * active[b]).sum() / n
        d = ref[b] - logp[b]
        kl = kl + ((torch.exp(d) - d - 1) * active[b]).sum() / n
    return pg / len(logp) + beta * kl / len(logp)


def test_loss_equals_naive_per_sample_reimplementation():
    g = torch.Generator().manual_seed(5)
    b, length = 5, 7
    active = torch.rand(b, length, generator=g) < 0.5
    active[:, 0] = True
    logp = (torch.randn(b, length, generator=g) * 0.3 - 2).requires_grad_(True)
    old = logp.detach() + torch.randn(b, length, generator=g) * 0.4
    ref = logp.detach() + torch.randn(b, length, generator=g) * 0.4
    adv = torch.randn(b, generator=g)
    loss, m = compute_loss("dtreerpo", PolicyBatch(advantages=adv, token_mask=torch.ones(b, length, dtype=torch.bool)),
                           PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref, observed_mask=active),
                           make_loss_config("dtreerpo"))
    logp2 = logp.detach().clone().requires_grad_(True)
    naive = naive_dtreerpo_loss(logp2, old, ref, active.float(), adv, 0.4, 0.01)
    assert torch.allclose(loss, naive, atol=1e-6)
    loss.backward()
    naive.backward()
    assert torch.allclose(logp.grad, logp2.grad, atol=1e-7)
    assert float(m["clipfrac"]) > 0


def test_on_policy_first_step_ratio_one_clip_zero(tiny_model_dirs):
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["llada"])
    trajs, n = _leaves(policy)
    leaves = [ScoredSample(t, prompt_index=i // n, sample_index=i % n, reward=float(i % 3 == 0), keep=True)
              for i, t in enumerate(trajs)]
    edges = tree_samples(leaves, TREE)
    assert len(edges) > 2
    learner = Learner(policy, LearnerConfig(algorithm="dtreerpo", estimator="intermediate_state", mu=1,
                                            micro_batch_size=4, optim=OptimConfig(lr=1e-4)))
    m = learner.update(edges)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0
    assert m["clipfrac"] == 0.0 and m["kl"] == 0.0 and m["optimizer_steps"] == 1 and math.isfinite(m["grad_norm"])


def test_several_inner_iterations_score_the_old_policy_once(tiny_model_dirs):
    """The intermediate-state estimator draws nothing: mu inner iterations share one old pass."""
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["llada"])
    trajs, n = _leaves(policy)
    leaves = [ScoredSample(t, prompt_index=0, sample_index=i, reward=float(i % 2), keep=True)
              for i, t in enumerate(trajs[:n])]
    edges = tree_samples(leaves, TREE)
    learner = Learner(policy, LearnerConfig(algorithm="dtreerpo", estimator="intermediate_state", mu=3,
                                            micro_batch_size=len(edges), reference_model=False,
                                            loss={"beta": 0.0}, optim=OptimConfig(lr=1e-4)))
    m = learner.update(edges)
    assert m["forwards_old"] == 1 and m["optimizer_steps"] == 3
