"""Value-model maths: GAE over decoding steps against a naive loop, closed forms, a hand-computed case, loss."""
from __future__ import annotations

import pytest
import torch

from rl.value import ValueHead, compact_steps, compute_value_targets, gather_positions, value_loss


def _naive_targets(values, step_ids, mask, rewards, gamma, lam, token_rewards=None):
    """One sample at a time, one token at a time, with dicts (TraceRL's reference procedure)."""
    b, n = values.shape
    adv, ret = torch.zeros(b, n, dtype=torch.float64), torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        toks = [j for j in range(n) if mask[i, j]]
        if not toks:
            continue
        steps = sorted({int(step_ids[i, j]) for j in toks})
        last = steps[-1]
        r = {j: (float(token_rewards[i, j]) if token_rewards is not None else 0.0)
             + (float(rewards[i]) if int(step_ids[i, j]) == last else 0.0) for j in toks}
        members = {s: [j for j in toks if int(step_ids[i, j]) == s] for s in steps}
        v_star = [sum(float(values[i, j]) for j in members[s]) / len(members[s]) for s in steps]
        r_star = [sum(r[j] for j in members[s]) / len(members[s]) for s in steps]
        count = len(steps)
        a_star, big_r = [0.0] * (count + 1), [0.0] * (count + 1)
        v_next = v_star + [0.0]
        for t in reversed(range(count)):
            a_star[t] = r_star[t] - v_star[t] + gamma * v_next[t + 1] + gamma * lam * a_star[t + 1]
            big_r[t] = r_star[t] + gamma * big_r[t + 1]
        for j in toks:
            t = steps.index(int(step_ids[i, j]))
            adv[i, j] = r[j] - float(values[i, j]) + gamma * v_next[t + 1] + gamma * lam * a_star[t + 1]
            ret[i, j] = r[j] + gamma * big_r[t + 1]
    return adv, ret


def _random_batch(seed=0, b=6, n=14):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, n, generator=g)
    step_ids = torch.randint(0, 9, (b, n), generator=g) * torch.randint(1, 3, (b, 1), generator=g)  # gaps
    valid = torch.randint(1, n + 1, (b,), generator=g)
    mask = torch.arange(n)[None, :] < valid[:, None]  # EOS truncation: different lengths and step counts
    mask[0] = torch.rand(n, generator=g) < 0.5  # an arbitrary mask too
    mask[1] = False  # and an empty sample
    rewards = torch.randn(b, generator=g)
    token_rewards = torch.randn(b, n, generator=g)
    return values, step_ids, mask, rewards, token_rewards


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (1.0, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("with_token_rewards", [False, True])
def test_matches_naive_loop(gamma, lam, with_token_rewards):
    values, step_ids, mask, rewards, token_rewards = _random_batch()
    tr = token_rewards if with_token_rewards else None
    out = compute_value_targets(values, step_ids, mask, rewards, gamma=gamma, lam=lam, token_rewards=tr)
    adv, ret = _naive_targets(values, step_ids, mask, rewards, gamma, lam, tr)
    assert torch.allclose(out.advantages.double(), adv, atol=1e-5)
    assert torch.allclose(out.returns.double(), ret, atol=1e-5)
    assert (out.advantages[~mask] == 0).all() and (out.returns[~mask] == 0).all()
    expected_steps = [len({int(s) for s, m in zip(step_ids[i], mask[i]) if m}) for i in range(mask.shape[0])]
    assert out.num_steps.tolist() == expected_steps
    gae = compute_value_targets(values, step_ids, mask, rewards, gamma=gamma, lam=lam, token_rewards=tr,
                                returns="gae")
    assert torch.allclose(gae.returns, torch.where(mask, out.advantages + values, 0.0), atol=1e-5)


def test_closed_form_gamma_lambda_one():
    values, step_ids, mask, rewards, token_rewards = _random_batch(seed=3)
    out = compute_value_targets(values, step_ids, mask, rewards)
    # outcome reward only: A_j = R - V_j and R_j = R on every counted token
    assert torch.allclose(out.advantages, torch.where(mask, rewards[:, None] - values, 0.0), atol=1e-5)
    assert torch.allclose(out.returns, torch.where(mask, rewards[:, None].expand_as(values), 0.0), atol=1e-6)
    # with token rewards: A_j = r_j + sum_{later steps k} r*_k - V_j; step advantages telescope to sum r - V*
    out = compute_value_targets(values, step_ids, mask, rewards, token_rewards=token_rewards)
    later = torch.flip(torch.cumsum(torch.flip(out.step_rewards, [1]), 1), [1]) - out.step_rewards  # sum_{k>t}
    rank = out.step_rank.clamp(min=0)
    expected = out.token_rewards + torch.gather(later, 1, rank) - values
    assert torch.allclose(out.advantages, torch.where(mask, expected, 0.0), atol=1e-5)
    assert torch.allclose(out.step_advantages, torch.where(out.step_mask, later + out.step_rewards - out.step_values,
                                                           0.0), atol=1e-5)


def test_hand_computed_gamma_09_lambda_08():
    # steps 3, 3, 5, 9 (compacted to 0, 0, 1, 2); the 5th token (step 4) is past EOS and does not count.
    values = torch.tensor([[0.2, 0.4, 0.5, 0.1, 7.0]])
    step_ids = torch.tensor([[3, 3, 5, 9, 4]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = compute_value_targets(values, step_ids, mask, torch.tensor([1.0]), gamma=0.9, lam=0.8)
    # V* = (0.3, 0.5, 0.1); r* = (0, 0, 1)
    # A*_2 = 1 - 0.1 = 0.9; A*_1 = 0 - 0.5 + 0.9*0.1 + 0.72*0.9 = 0.238; A*_0 = -0.3 + 0.45 + 0.72*0.238 = 0.32136
    assert torch.allclose(out.step_values, torch.tensor([[0.3, 0.5, 0.1]]))
    assert torch.allclose(out.step_advantages, torch.tensor([[0.32136, 0.238, 0.9]]), atol=1e-6)
    # A_j = r_j - V_j + 0.9 V*_{t+1} + 0.72 A*_{t+1}
    assert torch.allclose(out.advantages, torch.tensor([[0.42136, 0.22136, 0.238, 0.9, 0.0]]), atol=1e-6)
    # R*_t = r*_t + 0.9 R*_{t+1} = (0.81, 0.9, 1); R_j = r_j + 0.9 R*_{t+1}
    assert torch.allclose(out.step_returns, torch.tensor([[0.81, 0.9, 1.0]]), atol=1e-6)
    assert torch.allclose(out.returns, torch.tensor([[0.81, 0.81, 0.9, 1.0, 0.0]]), atol=1e-6)


def test_compact_steps_and_errors():
    rank, count = compact_steps(torch.tensor([[4, 2, 4, 9], [0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]))
    assert rank.tolist() == [[1, 0, 1, -1], [-1, -1, -1, -1]] and count.tolist() == [2, 0]
    with pytest.raises(ValueError, match="negative step id"):
        compact_steps(torch.tensor([[-1, 0]]), torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="rewards shape"):
        compute_value_targets(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(3))


def test_value_head_and_gather():
    head = ValueHead(8, init_std=0.02)
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    v = head(hidden)
    assert v.shape == (2, 5) and v.dtype == torch.float32
    v.sum().backward()
    assert head.proj.weight.grad is not None and torch.isfinite(head.proj.weight.grad).all()
    assert torch.equal(gather_positions(torch.arange(10.0).view(2, 5), torch.tensor([[4, 0], [1, 1]])),
                       torch.tensor([[4.0, 0.0], [6.0, 6.0]]))
    assert torch.equal(ValueHead(8)(hidden), torch.zeros(2, 5))  # zero init: V = 0 until trained


def test_value_loss_clipping_and_micro_batches():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(6, 7, generator=g, requires_grad=True)
    old = values.detach() + 0.3 * torch.randn(6, 7, generator=g)
    returns = torch.randn(6, 7, generator=g)
    mask = torch.rand(6, 7, generator=g) < 0.7
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2)
    naive, count = 0.0, 0
    for i in range(6):
        for j in range(7):
            if mask[i, j]:
                v, o, r = values[i, j].item(), old[i, j].item(), returns[i, j].item()
                v_clip = o + max(-0.2, min(0.2, v - o))
                naive += 0.5 * max((v - r) ** 2, (v_clip - r) ** 2)
                count += 1
    assert loss.item() == pytest.approx(naive / count, rel=1e-5)
    assert 0 < metrics["value_clipfrac"].item() < 1 and not metrics["value_loss"].requires_grad
    (grad_full,) = torch.autograd.grad(loss, values)
    total = mask.sum()
    parts = [value_loss(values[s], old[s], returns[s], mask[s], normalizer=total)[0] for s in (slice(0, 2), slice(2, 6))]
    (grad_split,) = torch.autograd.grad(parts[0] + parts[1], values)
    assert (parts[0] + parts[1]).item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(grad_split, grad_full, atol=1e-7)
