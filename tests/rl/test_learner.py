"""Learner on a tiny block-diffusion policy: on-policy ratios, gradient sign, micro-batch invariance, NaN skips,
state round trips, lr schedules."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.learner import Learner, LearnerConfig, ValueConfig
from rl.learner_batch import logp_gaps
from rl.optim import OptimConfig, lr_factor
from rollout.models.loading import load_policy
from rl.sample import ScoredSample
from rollout.trajectory import Trajectory


def make_trajectories(policy, n: int, *, seed: int = 0, length: int = 8, advantages=None, prefix: str = "r",
                      rollout_logp: bool = False) -> list[ScoredSample]:
    """Synthetic block-decoded rollouts (blocks of 4 decoded over 2 steps each, varied prompt and valid lengths),
    scored: advantage -1/+1 alternating (or `advantages`), reward 0/1."""
    g = torch.Generator().manual_seed(seed)
    block = policy.spec.block_size
    out = []
    for i in range(n):
        resp = torch.randint(10, 90, (length,), generator=g)
        steps = torch.cat([torch.randperm(block, generator=g) % 2 + 2 * b for b in range(length // block)])
        prompt = torch.randint(10, 90, (4 + i % 3,), generator=g)
        adv = (1.0 if i % 2 else -1.0) if advantages is None else advantages[i]
        out.append(Trajectory(prompt_ids=prompt, response_ids=resp, step_map=steps, logprobs=torch.zeros(length),
                              confidence=torch.zeros(length), valid_length=length - (i % 3), nfe=4,
                              finish_reason="eos", block_size=block, request_id=f"{prefix}{i}"))
        out[-1] = ScoredSample(out[-1], advantage=adv, reward=float(i % 2))
    if rollout_logp:  # what an exact rollout engine would have recorded
        est = get_estimator("trajectory")(policy, _inp(out))
        for b, s in enumerate(out):
            s.trajectory.logprobs = est.token_logp[b, :length].detach().clone()
    return out


def _inp(samples) -> EstimatorInput:
    trajs = [s.trajectory for s in samples]
    return EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                          [t.request_id for t in trajs], [t.valid_length for t in trajs],
                          [t.step_map for t in trajs], trajs[0].block_size)


def seq_logp(policy, trajs) -> torch.Tensor:
    with torch.no_grad():
        return get_estimator("trajectory")(policy, _inp(trajs)).seq_logp


@pytest.fixture
def policy(tiny_model_dirs):
    return load_policy(tiny_model_dirs["block"])


def weights(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def linear_adam(lr_over_eps: float = 1.0) -> OptimConfig:
    """AdamW whose first step is ~ lr/eps * gradient (eps >> |g|): weight deltas then measure the gradient."""
    return OptimConfig(lr=1e4 * lr_over_eps, eps=1e4, betas=(0.9, 0.999))


@pytest.mark.parametrize("algorithm,estimator", [("tracerl", "trajectory"), ("diffu_grpo", "one_step")])
def test_on_policy_first_step_ratio_one_clip_zero_kl_zero(policy, algorithm, estimator):
    trajs = make_trajectories(policy, 4, rollout_logp=True)
    learner = Learner(policy, LearnerConfig(algorithm=algorithm, estimator=estimator, mu=1, micro_batch_size=2,
                                            log_mismatch=True, optim=OptimConfig(lr=1e-4)))
    m = learner.update(trajs)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0
    assert m["clipfrac"] == 0.0 and m["kl"] == 0.0 and m["approx_kl"] == 0.0
    assert m["optimizer_steps"] == 1 and m["nan_skipped"] == 0 and math.isfinite(m["grad_norm"])
    assert m["logp_mismatch"] < 1e-5  # the rollout log-probs were exact
    assert m["forwards"] > 0 and m["lr"] == pytest.approx(1e-4)
    if algorithm == "diffu_grpo":
        assert m["forwards_ref"] > 0  # KL to a frozen reference copy


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_moves_sequence_likelihood(policy, sign):
    trajs = make_trajectories(policy, 1, advantages=[sign])
    before = seq_logp(policy, trajs)
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1,
                                            loss={"beta": 0.0}, optim=OptimConfig(lr=1e-4)))
    learner.update(trajs)
    after = seq_logp(policy, trajs)
    assert float(after - before) * sign > 0


def test_mixed_batch_raises_positive_and_lowers_negative(policy):
    trajs = make_trajectories(policy, 2, advantages=[1.0, -1.0])
    before = seq_logp(policy, trajs)
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="trajectory", loss={"beta": 0.0},
                                            optim=linear_adam(1e-2), grad_clip=None))
    learner.update(trajs)
    delta = seq_logp(policy, trajs) - before
    assert delta[0] > 0 > delta[1]


@pytest.mark.parametrize("algorithm,estimator", [("tracerl", "trajectory"), ("gdpo", "sdmc"),
                                                 ("cj_grpo", "trajectory")])
def test_micro_batch_split_equals_whole_batch(tiny_model_dirs, algorithm, estimator):
    deltas, norms = [], []
    splits = ((4, None), (1, None), (2, 2), (3, None)) if algorithm == "tracerl" else ((4, None), (1, None))
    # packed micro-batches of at most 40 / 64 layout tokens (layouts here are 20-22 tokens: 1-2 / 2-3 samples);
    # cj_grpo's pooled-step loss depends on the micro-batches themselves, so it refuses packing
    packs = (None,) * len(splits) + ((40, 64) if algorithm != "cj_grpo" else ())
    splits += ((1, None),) * (len(packs) - len(splits))
    for (micro, accum), pack in zip(splits, packs, strict=True):
        pol = load_policy(tiny_model_dirs["block"])
        trajs = make_trajectories(pol, 4)
        w0 = weights(pol)
        cfg = LearnerConfig(algorithm=algorithm, estimator=estimator, mu=1, micro_batch_size=micro,
                            grad_accum=accum, grad_clip=None, optim=linear_adam(), shuffle=False, pack_tokens=pack)
        m = Learner(pol, cfg).update(trajs)
        assert m["optimizer_steps"] == 1
        deltas.append({k: v - w0[k] for k, v in weights(pol).items()})
        norms.append(m["grad_norm"])
    assert len(deltas) == len(norms) > 1
    for other, norm in zip(deltas[1:], norms[1:]):
        assert norm == pytest.approx(norms[0], rel=1e-5)
        for k, d in deltas[0].items():
            torch.testing.assert_close(other[k], d, rtol=1e-4, atol=1e-7)
    assert max(float(d.abs().max()) for d in deltas[0].values()) > 1e-4  # the update did something


def test_grad_accum_gives_one_step_per_minibatch(policy):
    trajs = make_trajectories(policy, 4)
    cfg = LearnerConfig(mu=2, micro_batch_size=2, grad_accum=1, optim=OptimConfig(lr=1e-5))
    m = Learner(policy, cfg).update(trajs)
    assert m["optimizer_steps"] == 4  # 2 inner iterations x 2 minibatches of 2


def test_nan_loss_skips_step_keeps_weights(policy):
    trajs = make_trajectories(policy, 2, advantages=[float("nan"), 1.0])
    w0 = weights(policy)
    learner = Learner(policy, LearnerConfig(mu=1, optim=OptimConfig(lr=1e-3)))
    m = learner.update(trajs)
    assert m["nan_skipped"] == 1 and m["optimizer_steps"] == 0 and learner.optimizer_steps == 0
    for k, v in weights(policy).items():
        assert torch.equal(v, w0[k]), k
    m = learner.update(make_trajectories(policy, 2, prefix="ok"))
    assert m["nan_skipped"] == 0 and m["optimizer_steps"] == 1 and m["nan_skipped_total"] == 1
    assert any(not torch.equal(v, w0[k]) for k, v in weights(policy).items())


def test_state_dict_round_trip_bitwise(tiny_model_dirs):
    cfg = LearnerConfig(algorithm="diffu_grpo", estimator="one_step", mu=2, micro_batch_size=2, shuffle=True,
                        optim=OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine", total_steps=10,
                                          weight_decay=0.1))
    pol_a = load_policy(tiny_model_dirs["block"])
    ref = load_policy(tiny_model_dirs["block"])  # the initial checkpoint is the reference, also on resume
    first, second = make_trajectories(pol_a, 4, prefix="a"), make_trajectories(pol_a, 4, seed=1, prefix="b")
    a = Learner(pol_a, cfg, ref_policy=ref)
    a.update(first)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain types and tensors only (checkpoint format)
    pol_b = load_policy(tiny_model_dirs["block"])
    pol_b.model.load_state_dict(pol_a.model.state_dict())
    b = Learner(pol_b, cfg, ref_policy=ref)
    b.load_state_dict(state)
    ma, mb = a.update(second), b.update(second)
    for k, v in weights(pol_a).items():
        assert torch.equal(v, weights(pol_b)[k]), k
    for key in ("loss", "ratio_mean", "grad_norm", "lr"):
        assert ma[key] == mb[key]
    assert b.updates == 2 and b.optimizer_steps == 4


def test_value_model_trains_head_and_trunk(policy):
    trajs = make_trajectories(policy, 4)
    cfg = LearnerConfig(algorithm="tracerl", mu=1, micro_batch_size=2, value=ValueConfig(lr=1e-2),
                        optim=OptimConfig(lr=1e-4))
    learner = Learner(policy, cfg)
    head0 = copy.deepcopy(learner.value_head.state_dict())
    m1 = learner.update(trajs)
    assert "value_loss" in m1 and "value_clipfrac" in m1 and math.isfinite(m1["loss"])
    assert not torch.equal(learner.value_head.state_dict()["proj.bias"], head0["proj.bias"])
    m2 = learner.update(trajs)
    assert m2["value_error"] < m1["value_error"]  # values move towards the returns
    state = learner.state_dict()
    assert set(state["value_head"]) == {"proj.weight", "proj.bias"}


def test_separate_value_trunk(policy):
    trajs = make_trajectories(policy, 2)
    # The head starts at zero, so the trunk gets its first gradient on the second step.
    cfg = LearnerConfig(algorithm="tracerl", mu=2, value=ValueConfig(lr=1e-2, trunk="separate"))
    learner = Learner(policy, cfg)
    trunk0 = {k: v.clone() for k, v in learner.value_policy.model.state_dict().items()}
    m = learner.update(trajs)
    assert m["forwards_old"] > m["forwards_ref"] and "value_loss" in m
    changed = [k for k, v in learner.value_policy.model.state_dict().items() if not torch.equal(v, trunk0[k])]
    assert changed


def test_bad_batches_fail_with_one_line(policy):
    learner = Learner(policy, LearnerConfig())
    trajs = make_trajectories(policy, 2)
    trajs[1].advantage = None
    with pytest.raises(ValueError, match=r"trajectory r1: advantage missing"):
        learner.update(trajs)
    trajs = make_trajectories(policy, 2)
    trajs[1].trajectory.request_id = "r0"
    with pytest.raises(ValueError, match="duplicate request_id"):
        learner.update(trajs)


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", total_steps=6)
    assert [lr_factor(s, cos) for s in range(2)] == [0.5, 1.0]
    assert lr_factor(2, cos) == pytest.approx(1.0) and lr_factor(4, cos) == pytest.approx(0.5)
    assert lr_factor(6, cos) == pytest.approx(0.0) and lr_factor(99, cos) == pytest.approx(0.0)
    lin = OptimConfig(lr=1.0, schedule="linear", total_steps=4, min_lr_ratio=0.2)
    assert [round(lr_factor(s, lin), 6) for s in range(5)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert lr_factor(123, OptimConfig()) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        OptimConfig(schedule="cosine")


def test_lora_reference_is_adapters_off(policy):
    from rollout.models.lora import apply_lora

    apply_lora(policy, r=4, alpha=8)
    base0 = {k: v.clone() for k, v in policy.model.named_parameters() if "lora_" not in k}
    learner = Learner(policy, LearnerConfig(algorithm="diffu_grpo", estimator="one_step", mu=1,
                                            optim=OptimConfig(lr=1e-2)))
    assert learner.ref_policy is None and learner.need_ref
    m1 = learner.update(make_trajectories(policy, 2))
    assert m1["kl"] == 0.0 and m1["forwards_ref"] > 0  # fresh adapters (B = 0): policy == base
    m2 = learner.update(make_trajectories(policy, 2, prefix="second"))
    assert m2["kl"] > 0
    for k, v in policy.model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base0[k]), k


def test_activation_checkpointing_gives_the_same_update(tiny_model_dirs):
    deltas = []
    for ckpt in (False, True):
        pol = load_policy(tiny_model_dirs["block"])
        w0 = weights(pol)
        cfg = LearnerConfig(mu=1, micro_batch_size=2, gradient_checkpointing=ckpt, optim=linear_adam(),
                            grad_clip=None)
        Learner(pol, cfg).update(make_trajectories(pol, 2))
        deltas.append({k: v - w0[k] for k, v in weights(pol).items()})
    for k, d in deltas[0].items():
        torch.testing.assert_close(deltas[1][k], d, rtol=1e-4, atol=1e-7)


def test_logp_mismatch_counts_each_valid_token_once():
    """The learner's one train/inference mismatch metric: |learner - rollout| over tokens through valid_length."""
    mine = [torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64), torch.tensor([0.5, -0.5, 0.3], dtype=torch.float64)]
    theirs = [mine[0] + torch.tensor([0.1, -0.3, 5.0], dtype=torch.float64),  # the 5.0 lies past valid_length
              mine[1] + torch.tensor([0.2, 0.0, -0.1], dtype=torch.float64)]
    gaps = logp_gaps(mine, theirs, [2, 3])
    assert gaps.numel() == 5
    assert gaps.mean().item() == pytest.approx((0.1 + 0.3 + 0.2 + 0.0 + 0.1) / 5)
    assert gaps.max().item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="2 learner rows, 1 rollout rows"):
        logp_gaps(mine, theirs[:1], [2, 3])
