"""JustGRPO: AR-order rollouts (one token a step, left to right) with exact log-probs, and its GRPO loss.

- the engine's `left_to_right` decode equals a naive loop written here (one plain whole-sequence forward per token
  over [prompt, y_<t, masks], inverse-CDF sampling with the row's own uniforms), tokens and log-probs, for
  block-causal and full-attention tiny models (cached and uncached decoders);
- the learner's exact AR log-probs (`ar_exact`) recompute the recorded ones within 1e-5;
- advantages and loss equal a per-sample re-implementation of grpo.py's equations; on-policy ratio 1, clip 0.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from rl.advantages import advantage_estimator
from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss
from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.engine import TorchEngine
from rollout.models.masks import sequence_bias
from rollout.sampling import GenerationRequest, SamplingParams

CASES = [("block", "block"), ("sdar", "block"), ("sdar", "none"), ("llada", "none"), ("dream", "none")]


@pytest.fixture(scope="module")
def ar_policies(tiny_model_dirs):
    """Tiny policies; the full-attention ones decode in blocks of 4, so a 12-token canvas spans three blocks."""
    from rollout.models.loading import load_policy

    return {kind: load_policy(path, block_size=None if kind in ("block", "sdar") else 4)
            for kind, path in tiny_model_dirs.items()}


def naive_ar_decode(policy, prompt: torch.Tensor, length: int, seed: int, temperature: float):
    """Left to right, one token a step: the logits of position t from one forward over the whole sequence
    [prompt | y_<t | masks] under the model's attention rule; the token by inverse CDF with the first of the
    uniforms the row draws that step (one per masked position of its block, as every diffrl decoder draws)."""
    spec = policy.spec
    p, bs = prompt.numel(), spec.block_size
    head = p - spec.block_origin(p) if spec.is_block else 0  # prompt tokens in the first canvas block
    n = length - head
    gen = torch.Generator().manual_seed(seed)
    tokens, logps = [], []
    for t in range(n):
        seq = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long),
                         torch.full((n - t,), spec.mask_token_id, dtype=torch.long)])
        alignment = spec.block_alignment if spec.is_block else "response"
        bias = sequence_bias(p, n, bs, full=not spec.is_block, alignment=alignment)
        with torch.no_grad():
            logits = policy.forward(seq[None], torch.arange(seq.numel())[None], bias).logits[0]
        row = p + t - (1 if spec.logits_shift else 0)
        logp = torch.log_softmax(logits[row].float() / temperature, -1)
        masked_in_block = bs - (head + t) % bs
        u = torch.rand(masked_in_block, 1, generator=gen)[0, 0].double()
        cdf = logp.double().exp().cumsum(-1)
        token = int((cdf <= u * cdf[-1]).sum())
        tokens.append(token)
        logps.append(float(logp[token]))
    return torch.tensor(tokens), torch.tensor(logps)


def ar_requests(policy, lengths=(3, 6, 5), max_tokens=12, temperature=1.3):
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, remasking="left_to_right",
                              stop_at_eos=False)
    g = torch.Generator().manual_seed(0)
    return [GenerationRequest(torch.randint(10, 90, (n,), generator=g), sampling, seed=7 + i, request_id=f"q{i}")
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("kind, cache", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_left_to_right_decode_equals_naive_loop(ar_policies, kind, cache):
    policy = ar_policies[kind]
    requests = ar_requests(policy)
    trajectories = TorchEngine(policy, kv_cache=cache).generate(requests)
    for req, traj in zip(requests, trajectories, strict=True):
        tokens, logps = naive_ar_decode(policy, req.prompt_ids, req.sampling.max_tokens, req.seed, 1.3)
        assert traj.response_ids.tolist() == tokens.tolist(), (kind, req.request_id)
        assert torch.allclose(traj.logprobs, logps, atol=1e-5), (traj.logprobs - logps).abs().max()
        # exactly one token a step, left to right
        assert traj.step_map.tolist() == list(range(traj.response_length))
        assert traj.nfe == traj.response_length


@pytest.mark.parametrize("kind", ["sdar", "block", "llada", "dream"])
def test_learner_recomputes_recorded_ar_log_probs(ar_policies, kind):
    policy = ar_policies[kind]
    trajectories = TorchEngine(policy).generate(ar_requests(policy))
    inp = EstimatorInput([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
                         [t.request_id for t in trajectories], None, [t.step_map for t in trajectories],
                         trajectories[0].block_size)
    with torch.no_grad():
        est = get_estimator("ar_exact")(policy, inp, temperature=1.3)
    for b, t in enumerate(trajectories):
        n = t.response_length
        assert n > 0
        assert (est.token_logp[b, :n] - t.logprobs).abs().max().item() <= 1e-5
        assert float(est.seq_logp[b]) == pytest.approx(float(t.logprobs.sum()), abs=1e-4)
    # full attention: one forward per position; block models: one forward, a canvas per position within a block
    expected = 1 if policy.spec.is_block else max(t.response_length for t in trajectories)
    assert est.forwards == expected


def test_ar_exact_refuses_a_trajectory_not_decoded_left_to_right(ar_policies):
    policy = ar_policies["sdar"]
    sampling = SamplingParams(temperature=1.0, max_tokens=8, remasking="low_confidence_static", steps_per_block=2,
                              stop_at_eos=False)
    traj = TorchEngine(policy).generate([GenerationRequest(torch.tensor([11, 12, 13, 14]), sampling, seed=1,
                                                           request_id="conf")])[0]
    inp = EstimatorInput([traj.prompt_ids], [traj.response_ids], ["conf"], None, [traj.step_map], 4)
    with pytest.raises(ValueError, match="sample 'conf' was not decoded left to right"):
        get_estimator("ar_exact")(policy, inp)


# ------------------------------------------------------------------------------------------------ loss
def naive_group_advantages(rewards: list[float], group: int) -> list[float]:
    """grpo.py compute_group_advantages: (r - mean) / (std + 1e-4), std with Bessel's correction."""
    out = []
    for start in range(0, len(rewards), group):
        g = rewards[start:start + group]
        mean, std = statistics.fmean(g), statistics.stdev(g)
        out += [(r - mean) / (std + 1e-4) for r in g]
    return out


def naive_justgrpo_loss(logp, old, adv, length, eps=0.2) -> float:
    """grpo.py logprob_loss: sum over samples and generated positions of -min(rho A, clip(rho) A), scaled by
    1 / gen_length / valid_samples (valid = A != 0)."""
    valid = sum(1 for a in adv if a != 0)
    total = 0.0
    for i, a in enumerate(adv):
        for t in range(length):
            rho = math.exp(logp[i][t] - old[i][t])
            total += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
    return total / length / valid


def test_advantages_and_loss_equal_grpo_py_equations():
    g = torch.Generator().manual_seed(3)
    group, length = 4, 6
    rewards = torch.tensor([0., 1., 1., 0.5, 2., 2., 2., 2., 0., 0., 1., 0.])  # second group: no spread
    result = advantage_estimator("justgrpo")(rewards, group_ids=torch.arange(12) // group, norm="zscore")
    naive = naive_group_advantages(rewards.tolist(), group)
    assert result.advantages.tolist() == pytest.approx(naive, abs=1e-6)
    assert result.keep.tolist() == [a != 0 for a in naive] and not result.keep[4:8].any()
    kept = result.keep.nonzero().squeeze(1)
    logp = torch.randn(12, length, generator=g) - 2.0
    old = logp + 0.4 * torch.randn(12, length, generator=g)  # ratios on both sides of the clip range
    # the learner trains the kept samples only, every generated position (token_set response)
    batch = PolicyBatch(advantages=result.advantages[kept], token_mask=torch.ones(len(kept), length, dtype=torch.bool))
    loss, metrics = compute_loss("justgrpo", batch, PolicyEstimates(logp=logp[kept], old_logp=old[kept]))
    expected = naive_justgrpo_loss(logp.tolist(), old.tolist(), naive, length)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert 0 < float(metrics["clipfrac"]) < 1


def test_group_of_one_and_bad_options():
    result = advantage_estimator("justgrpo")(torch.tensor([1.0, 0.0, 1.0]), group_ids=torch.tensor([0, 1, 1]))
    assert result.advantages[0] == 0 and not result.keep[0]
    with pytest.raises(ValueError, match="JustGRPO's advantage"):
        advantage_estimator("justgrpo")(torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
                                        norm="mean_centered")


@pytest.mark.parametrize("kind", ["sdar", "llada"])
def test_on_policy_first_step_ratio_one_clip_zero(tiny_model_dirs, kind):
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs[kind], block_size=None if kind == "sdar" else 4)  # trained in place
    trajectories = TorchEngine(policy).generate(ar_requests(policy, lengths=(3, 6, 5, 4), temperature=1.0))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = advantage_estimator("justgrpo")(rewards, group_ids=torch.zeros(4, dtype=torch.long))
    samples = [ScoredSample(t, advantage=float(a), keep=bool(k), reward=float(r))
               for t, a, k, r in zip(trajectories, adv.advantages, adv.keep, rewards)]
    learner = Learner(policy, LearnerConfig(algorithm="justgrpo", estimator="ar_exact", mu=1, micro_batch_size=2,
                                            log_mismatch=True, optim=OptimConfig(lr=1e-4)))
    m = learner.update([s for s in samples if s.keep])
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0 and m["clipfrac"] == 0.0
    assert m["logp_mismatch"] < 1e-5 and m["optimizer_steps"] == 1 and math.isfinite(m["grad_norm"])
    assert m["num_tokens"] > 0


def test_recipe_rules_for_justgrpo():
    from pathlib import Path

    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    base = Path(__file__).resolve().parents[2] / "recipes" / "tiny-justgrpo.yaml"
    r = load_recipe(base)
    assert (r.rollout.remasking, r.rollout.stop_at_eos, r.estimator.name) == ("left_to_right", False, "ar_exact")
    with pytest.raises(RecipeError, match="rollout.remasking: estimator ar_exact scores AR-order rollouts"):
        load_recipe(base, overrides=["rollout.remasking=low_confidence_static"])
    with pytest.raises(RecipeError, match="estimator.name: justgrpo needs exact left-to-right log-probs"):
        load_recipe(base, overrides=["estimator.name=one_step"])
