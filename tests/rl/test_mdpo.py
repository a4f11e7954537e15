"""MDPO: per-step advantages and the loss against naive re-implementations of the reference's equations
(autonomousvision/mdpo mdpo_trainer.py), the intermediate-state estimator against a plain forward, the
driver's per-step rewards, and the first on-policy inner step (ratio 1, no clipping) on real recorded rollouts."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from launch.driver_steps import assign_step_advantages, learner_samples, prediction_text, score_steps
from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators.base import EstimatorInput
from rl.estimators.intermediate import intermediate_state_estimator
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rl.step_samples import (
    SCORED,
    UNPREDICTED,
    VISIBLE,
    intermediate_sample,
    mdpo_step_advantages,
    padded_step_rewards,
    select_steps,
)
from rollout.engine import TorchEngine
from rollout.models.masks import sequence_bias
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.trajectory import Trajectory


def naive_step_advantages(rewards: list[list[float]], groups: list[int]) -> list[list[float]]:
    """The reference's adv-v4, one sample and one step at a time, then the per-step group z-score."""
    values = []
    for r in rewards:
        t_max = len(r)
        row = []
        for t in range(t_max):
            a = (r[t] - (r[t - 1] if t else 0.0)) + 1
            a += sum(r[t + 1:]) / (t_max - 1 - t) if t < t_max - 1 else r[-1]
            row.append(a)
        values.append(row)
    out = [[0.0] * len(r) for r in rewards]
    for g in set(groups):
        members = [i for i, x in enumerate(groups) if x == g]
        for t in range(len(rewards[0])):
            col = [values[i][t] for i in members]
            mean = sum(col) / len(col)
            std = math.sqrt(sum((c - mean) ** 2 for c in col) / (len(col) - 1)) if len(col) > 1 else 0.0
            for i in members:
                out[i][t] = (values[i][t] - mean) / (std + 1e-4)
    return out


def test_step_advantages_equal_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(6, 5, generator=g) > 0.5).double() * torch.rand(6, 5, generator=g, dtype=torch.float64)
    groups = [0, 0, 0, 1, 1, 2]  # a group of one gets 0
    got = mdpo_step_advantages(rewards, torch.tensor(groups))
    want = torch.tensor(naive_step_advantages(rewards.tolist(), groups), dtype=torch.float64)
    assert torch.allclose(got.double(), want, atol=1e-4)
    assert torch.all(got[5] == 0)


def test_padding_repeats_the_final_reward_and_steps_rank_by_abs_advantage():
    padded = padded_step_rewards([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0, 0.5])])
    assert padded.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.5]]
    assert select_steps(torch.tensor([0.1, -2.0, 0.5, 1.0]), 2, 4) == [1, 3]
    assert select_steps(torch.tensor([0.1, -2.0, 0.5, 9.0]), 5, 3) == [1, 2, 0]  # only the sample's own steps


def _recorded(mask_id=2):
    states = torch.tensor([[mask_id] * 4, [10, mask_id, mask_id, mask_id], [10, 11, mask_id, 13]])
    predictions = torch.tensor([[10, 11, 12, 13], [10, 11, 14, 13], [10, 11, 12, 13]])
    conf = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.0, 0.6, 0.7, 0.0], [0.0, 0.0, 0.9, 0.0]])  # step 1: col 3 unpredicted
    traj = Trajectory(prompt_ids=torch.tensor([5, 6]), response_ids=torch.tensor([10, 11, 12, 13]),
                      step_map=torch.tensor([0, 1, 2, 0]), logprobs=torch.zeros(4), confidence=torch.zeros(4),
                      valid_length=4, nfe=3, finish_reason="length", block_size=4,
                      sampling={"mask_token_id": mask_id}, request_id="r0", step_states=states,
                      step_predictions=predictions, step_confidence=conf)
    traj.validate()
    return ScoredSample(traj, prompt_index=0, sample_index=0, reward=1.0, keep=True)


def test_intermediate_sample_encodes_the_state_and_weights_tokens():
    sample = _recorded()
    pseudo = intermediate_sample(sample, 1, advantage=-0.5, mask_token_id=2)
    t = pseudo.trajectory
    t.validate()
    assert t.step_map.tolist() == [VISIBLE, SCORED, SCORED, UNPREDICTED]
    assert t.response_ids.tolist() == [10, 11, 14, 13] and t.request_id == "r0@step1"
    lam = 4 / (3 + 1e-4)  # L over the masked positions, predicted or not
    assert torch.allclose(pseudo.advantage, torch.tensor([0.0, -0.5 * 0.6 * lam, -0.5 * 0.7 * lam, 0.0]))


def naive_mdpo_loss(units, eps):
    """mdpo_trainer.compute_loss per (sample, step) micro-batch: sum_j -min(rho A, clip(rho) A) lambda c_j over the
    state's masked positions / their count; the mean over micro-batches."""
    total = 0.0
    for u in units:
        masked = u["masked"]
        lam = masked.numel() / (int(masked.sum()) + 1e-4)
        rho = torch.exp(u["logp"] - u["old"])
        per = -torch.min(rho * u["A"], torch.clamp(rho, 1 - eps, 1 + eps) * u["A"]) * lam
        total = total + (per * masked * u["conf"]).sum() / (masked.sum() + 1e-4)
    return total / len(units)


def test_loss_equals_naive_per_sample_reimplementation():
    g = torch.Generator().manual_seed(3)
    length, units, pseudo = 6, [], []
    for k in range(5):
        masked = torch.rand(length, generator=g) < 0.6
        masked[k % length] = True
        conf = torch.where(masked, torch.rand(length, generator=g) * 0.9 + 0.05, torch.zeros(length))
        adv = float(torch.randn(1, generator=g))
        state = torch.where(masked, torch.full((length,), 2), torch.arange(length) + 10)
        traj = Trajectory(prompt_ids=torch.tensor([5]), response_ids=torch.arange(length) + 10,
                          step_map=torch.zeros(length, dtype=torch.long), logprobs=torch.zeros(length),
                          confidence=torch.zeros(length), valid_length=length, nfe=1, finish_reason="length",
                          block_size=length, sampling={}, request_id=f"r{k}", step_states=state[None],
                          step_predictions=(torch.arange(length) + 10)[None], step_confidence=conf[None])
        pseudo.append(intermediate_sample(ScoredSample(traj, keep=True), 0, adv, mask_token_id=2))
        units.append({"masked": masked, "conf": conf, "A": adv})
    logp = (torch.randn(5, length, generator=g) * 0.3 - 2).requires_grad_(True)
    old = logp.detach() + torch.randn(5, length, generator=g) * 0.3
    observed = torch.stack([p.trajectory.step_map == SCORED for p in pseudo])
    adv = torch.stack([p.advantage for p in pseudo])
    loss, m = compute_loss("mdpo", PolicyBatch(advantages=adv, token_mask=torch.ones(5, length, dtype=torch.bool)),
                           PolicyEstimates(logp=logp, old_logp=old, observed_mask=observed),
                           make_loss_config("mdpo"))
    logp2 = logp.detach().clone().requires_grad_(True)
    for k, u in enumerate(units):
        u["logp"], u["old"] = logp2[k], old[k]
    naive = naive_mdpo_loss(units, 0.2)
    assert torch.allclose(loss.double(), naive.double(), rtol=1e-4, atol=1e-6)
    loss.backward()
    naive.backward()
    assert torch.allclose(logp.grad, logp2.grad, rtol=1e-4, atol=1e-7)
    assert float(m["clipfrac"]) > 0


def _rollouts(policy, n=4, remasking="low_confidence_static"):
    params = SamplingParams(temperature=1.0, max_tokens=32, remasking=remasking, steps_per_block=4,
                            record_steps=True)
    requests = [GenerationRequest(torch.tensor([12, 13, 14, 15][: 2 + k % 3]), params, seed=k, request_id=f"q{k}")
                for k in range(n)]
    return TorchEngine(policy, kv_cache="none").generate(requests)


def test_estimator_scores_the_state_as_a_plain_forward(tiny_policies):
    policy = tiny_policies["llada"]
    traj = _rollouts(policy, 1)[0]
    pseudo = intermediate_sample(ScoredSample(traj, keep=True), 2, 1.0, policy.spec.mask_token_id).trajectory
    inp = EstimatorInput([pseudo.prompt_ids], [pseudo.response_ids], ["a"], step_maps=[pseudo.step_map])
    with torch.no_grad():
        est = intermediate_state_estimator(policy, inp, temperature=0.5)
        seq = torch.cat([pseudo.prompt_ids, traj.step_states[2]])
        bias = sequence_bias(pseudo.prompt_ids.numel(), traj.response_length, policy.spec.block_size, full=True)
        logits = policy.forward(seq[None], torch.arange(seq.numel())[None], bias).logits[0]
    p = pseudo.prompt_ids.numel()
    want = torch.log_softmax(logits[p:] / 0.5, -1).gather(-1, pseudo.response_ids[:, None]).squeeze(-1)
    scored = pseudo.step_map == SCORED
    assert scored.sum() > 0 and torch.equal(est.token_mask[0], scored)
    assert torch.allclose(est.token_logp[0][scored], want[scored], atol=1e-5)
    assert est.forwards == 1
    # at temperature 1 the scored log-probs are the rollout's own sampling probabilities
    with torch.no_grad():
        est1 = intermediate_state_estimator(policy, inp)
    assert torch.allclose(est1.token_logp[0][scored], pseudo.logprobs[scored], atol=1e-5)


class _Tok:
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


class _Rewards:
    def __init__(self):
        self.items = []

    def score(self, items):
        self.items += items
        return [{"score": float(len(item["response"]) % 3 == 0), "reason": "x", "metrics": {}} for item in items]


def test_driver_scores_every_step_and_trains_on_the_chosen_ones(tiny_policies, monkeypatch):
    import launch.driver_steps as steps

    policy = tiny_policies["llada"]
    trajs = _rollouts(policy, 4, remasking="rcr")
    samples = [ScoredSample(t, prompt_index=0, sample_index=i, keep=True) for i, t in enumerate(trajs)]
    algorithm = SimpleNamespace(name="mdpo", train_steps=3)
    monkeypatch.setattr(steps, "response_item", lambda prompt, text, n, data: {"response": text, "n": n})
    rewards = _Rewards()
    metrics = score_steps([None], samples, n=4, tokenizer=_Tok(), rewards=rewards, data=None, algorithm=algorithm)
    assert metrics["reward/step_calls"] == sum(t.step_states.shape[0] for t in trajs) == len(rewards.items)
    traj = trajs[0]
    _, count = prediction_text(traj, 0, _Tok())
    kept = [i for i in traj.step_predictions[0].tolist() if i != policy.spec.mask_token_id]
    assert count == (kept.index(1) + 1 if 1 in kept else len(kept))
    assign_step_advantages(samples, 4, algorithm)
    want = naive_step_advantages([s.step_rewards.tolist() for s in samples], [0, 0, 0, 0])
    for s, w in zip(samples, want):
        assert torch.allclose(s.step_advantages.double(), torch.tensor(w, dtype=torch.float64), atol=1e-4)
    trained = learner_samples(samples, algorithm)
    assert len(trained) == 3 * len(samples)
    assert trained[0].request_id.startswith("q0@step")
    for t in trained:
        t.trajectory.validate()


def test_on_policy_first_step_ratio_one_clip_zero(tiny_model_dirs):
    from rollout.models.loading import load_policy

    policy = load_policy(tiny_model_dirs["llada"])
    trajs = _rollouts(policy, 4)
    samples = [ScoredSample(t, prompt_index=0, sample_index=i, keep=True) for i, t in enumerate(trajs)]
    g = torch.Generator().manual_seed(0)
    for s in samples:
        s.step_rewards = torch.rand(s.trajectory.step_states.shape[0], generator=g, dtype=torch.float64)
    algorithm = SimpleNamespace(name="mdpo", train_steps=2)
    assign_step_advantages(samples, 4, algorithm)
    learner = Learner(policy, LearnerConfig(algorithm="mdpo", estimator="intermediate_state", mu=1,
                                            micro_batch_size=4, temperature=1.0,
                                            optim=OptimConfig(lr=1e-4)))
    m = learner.update(learner_samples(samples, algorithm))
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0
    assert m["clipfrac"] == 0.0 and m["optimizer_steps"] == 1 and math.isfinite(m["grad_norm"])
    assert m["num_samples"] == 8 and m["num_tokens"] > 0
