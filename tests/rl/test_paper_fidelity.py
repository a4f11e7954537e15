"""Issue 17 items 1-7: each algorithm against a naive re-implementation written from its paper / reference code
(plain loops, float64), on small random inputs or a tiny model. docs/FIDELITY.md `## Algorithms` names these."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from rl.advantages import group_advantages, wd1_weights
from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.learner import Learner, LearnerConfig, ValueConfig
from rl.masking import MASK_SAMPLERS, draw_masks, sample_generator
from rl.optim import OptimConfig, lr_factor
from rollout.models.loading import load_policy
from rl.sample import ScoredSample
from rollout.trajectory import Trajectory

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _trajectories(policy, n, *, length=8, valid=(5, 8, 3, 6), steps=None, prefix="s"):
    """Rollouts of `length` tokens whose first EOS ends at valid[i] (the rest is EOS padding)."""
    g = torch.Generator().manual_seed(7)
    block = min(4, policy.spec.block_size)  # the rollout's block (LLaDA: semi-autoregressive)
    out = []
    for i in range(n):
        resp = torch.randint(10, 90, (length,), generator=g)
        step_map = steps[i] if steps is not None else torch.cat(
            [torch.randperm(block, generator=g) % 2 + 2 * b for b in range(length // block)])
        out.append(Trajectory(prompt_ids=torch.randint(10, 90, (4 + i % 2,), generator=g), response_ids=resp,
                              step_map=step_map, logprobs=torch.zeros(length), confidence=torch.zeros(length),
                              valid_length=valid[i % len(valid)], nfe=4, finish_reason="eos", block_size=block,
                              request_id=f"{prefix}{i}"))
    return out


def _scored(trajs, fields=None) -> list[ScoredSample]:
    """The learner's input: advantage +-1 and reward 0/1 alternating, or `fields[i]` for sample i."""
    return [ScoredSample(t, **{"advantage": 1.0 if i % 2 else -1.0, "reward": float(i % 2), **(fields or {}).get(i, {})})
            for i, t in enumerate(trajs)]


def _one_forward_logp(policy, prompt, response, masked) -> torch.Tensor:
    """log p(response_i | prompt, response with `masked` replaced by the mask token) at every position (model)."""
    noisy = torch.where(masked, torch.full_like(response, policy.spec.mask_token_id), response)
    with torch.no_grad():
        out = policy.score_responses([prompt], [response], [noisy], score_mask=[masked])
    return out.logprobs[0, :response.numel()].double()


# ------------------------------------------------------------------------------------------ 1. GDPO ratio
def test_gdpo_ratio_is_exp_of_elbo_difference_over_generation_length(tiny_model_dirs):
    """GDPO: r = exp((ELBO_new - ELBO_old) / L), ELBO over the tokens through the first EOS, L the generation
    length; checked at the learner's second inner iteration, after a real optimizer step."""
    policy = load_policy(tiny_model_dirs["llada"])
    old_policy = copy.deepcopy(policy)
    trajs = _trajectories(policy, 2, length=8, valid=(5, 3))
    learner = Learner(policy, LearnerConfig(algorithm="gdpo", estimator="sdmc", mu=2, micro_batch_size=1,
                                            shuffle=False, optim=OptimConfig(lr=3e-3)))
    seen = []

    def naive_elbo(pol, traj, inner_iter):
        (draw,) = draw_masks("sdmc", [traj.response_length], [traj.request_id], base_seed=learner._mask_seed,
                             inner_iter=inner_iter, rule="gauss", nodes=3)
        total = 0.0
        for k in range(draw.num_forwards):
            lp = _one_forward_logp(pol, traj.prompt_ids, traj.response_ids, draw.masks[k])
            for i in range(traj.valid_length):  # through the first EOS, never the padding after it
                if draw.masks[k, i]:
                    total += float(draw.token_weights[k, i]) * float(lp[i])
        return total

    inner = {"calls": 0}
    loss_fn = learner.loss_fn

    def capture(batch, est, config):
        loss, metrics = loss_fn(batch, est, config)
        it = inner["calls"] // len(trajs)
        traj = trajs[inner["calls"] % len(trajs)]
        inner["calls"] += 1
        if it == 1:
            new, old = naive_elbo(policy, traj, 1), naive_elbo(old_policy, traj, 1)
            seen.append((float(metrics["ratio_mean"]), math.exp((new - old) / traj.response_length), new - old))
        return loss, metrics

    learner.loss_fn = capture
    learner.update(_scored(trajs))
    assert len(seen) == 2
    for got, want, diff in seen:
        assert abs(diff) > 1e-3  # the weights moved: the test can tell divisors apart
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------ 2. TraceRL value model
def test_tracerl_value_model_learns_the_group_normalised_reward(tiny_model_dirs):
    """dLLM-RL trains its value model on the group z-scored, accuracy-filtered reward (reward/rl_reward.py ->
    train_trado_value.py): with gamma = lambda = 1 the value targets are that reward on every counted token."""
    policy = load_policy(tiny_model_dirs["block"])
    raw = [1.0, 0.0, 0.0, 1.0]
    mean = sum(raw) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in raw) / 4)  # population std, as z_score_normalize
    z = [(r - mean) / std for r in raw]
    trajs = _trajectories(policy, 4)
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, micro_batch_size=4,
                                            value=ValueConfig(), optim=OptimConfig(lr=1e-5)))
    m = learner.update(_scored(trajs, {i: {"reward": raw[i], "advantage": z[i]} for i in range(4)}))
    counts = [t.valid_length for t in trajs]
    expected = sum(n * zi for n, zi in zip(counts, z, strict=True)) / sum(counts)
    assert m["return_mean"] == pytest.approx(expected, abs=1e-6)


def test_tracerl_length_limit_counts_as_wrong_before_normalising_and_filtering():
    """dLLM-RL: correctness False when length >= max_gen_length - 5; z-score of correctness within the group; groups
    with accuracy (after that rule) outside [0.2, 0.8] dropped."""
    from rl.advantages import near_length_limit

    max_tokens, margin = 20, 5
    lengths = torch.tensor([14, 15, 19, 20, 3, 16, 10, 12, 9, 11])
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    groups = torch.tensor([0] * 5 + [1] * 5)
    cut = near_length_limit(lengths, max_tokens, margin)
    rewards = torch.where(cut, 0.0, correct.float())
    result = group_advantages(rewards, group_ids=groups, norm="zscore", correct=correct & ~cut,
                              accuracy_lo=0.2, accuracy_hi=0.8)
    for g in range(2):
        idx = [i for i in range(10) if groups[i] == g]
        c = [bool(correct[i]) and not int(lengths[i]) >= max_tokens - margin for i in idx]
        mu = sum(c) / len(c)
        sd = math.sqrt(sum((x - mu) ** 2 for x in c) / len(c))
        keep = 0.2 <= mu <= 0.8
        for i, x in zip(idx, c, strict=True):
            want = ((x - mu) / sd if sd else 0.0) if keep else 0.0
            assert float(result.advantages[i]) == pytest.approx(want, abs=1e-5)
            assert bool(result.keep[i]) == keep
    assert not near_length_limit(lengths, max_tokens, None).any()


# ---------------------------------------------------------------------------------------- 3. coupled-GRPO
def test_coupled_grpo_recipe_and_defaults_are_diffucoders():
    from launch.driver_roles import learner_config
    from launch.recipe import load_recipe
    from launch.recipe_sections import CoupledGRPO

    # src/open_r1/coupled_grpo.py hard-codes leave_one_out = True; scale_rewards: false (no std division).
    assert CoupledGRPO().advantage == "leave_one_out"
    recipe = load_recipe(RECIPES / "coupled-grpo-dream-code.yaml")
    ln, ro = recipe.learner, recipe.rollout
    assert recipe.algorithm.advantage == "leave_one_out"
    assert (ln.lr, tuple(ln.betas), ln.weight_decay, ln.grad_clip, ln.mu) == (1e-6, (0.9, 0.99), 0.1, 0.2, 2)
    assert (ln.schedule, ln.min_lr_ratio) == ("cosine", 0.1)
    assert (ro.steps, ro.max_tokens, ro.temperature, ro.samples_per_prompt) == (256, 256, 1.0, 10)
    assert ro.remasking == "entropy"  # DiffuCoder rollouts: diffusion_generate(alg="entropy", alg_temp=0.0)
    assert recipe.data.max_prompt_tokens == 200
    optim = learner_config(recipe).optim
    assert optim.min_lr_ratio == 0.1 and optim.schedule == "cosine"
    # HF cosine_with_min_lr: factor = min + (1 - min) * 0.5 * (1 + cos(pi * progress)).
    total = optim.total_steps
    for step in (0, 1, total // 3, total // 2, total - 1, total, total + 5):
        progress = min(1.0, step / total)
        assert lr_factor(step, optim) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    # Leave-one-out advantages: R_i - mean of the OTHER G - 1 rewards of its group, no std division
    # (= G / (G - 1) x the mean-centred advantage: 10/9 at G 10).
    rewards = torch.tensor([2.5, 0.0, 0.5, 2.5, 0.0, 1.0, 0.0, 0.0, 2.0, 0.5, 1.0, 0.0, 0.0, 3.0])
    groups = torch.tensor([0] * 10 + [1] * 4)
    adv = group_advantages(rewards, group_ids=groups, norm=recipe.algorithm.advantage).advantages
    naive = []
    for i in range(len(rewards)):
        others = [float(rewards[j]) for j in range(len(rewards)) if groups[j] == groups[i] and j != i]
        naive.append(float(rewards[i]) - sum(others) / len(others))
    assert adv.tolist() == pytest.approx(naive, abs=1e-6)
    single = group_advantages(torch.tensor([1.0, 2.0]), group_size=1, norm="leave_one_out").advantages
    assert single.tolist() == [0.0, 0.0]  # a group of one has no other sample to compare with


def test_coupled_token_logprob_is_diffucoders_three_view_mix(tiny_model_dirs):
    """DiffuCoder coupled_grpo.py selective_log_softmax: per token (log p_full + w log p_view) / 2, with view 1 the
    tokens {u < t} (w = 1/t), view 2 the complement (w = 1/(1-t)), p_view the log-prob in the view masking it."""
    policy = load_policy(tiny_model_dirs["llada"])
    trajs = _trajectories(policy, 2, length=8, valid=(5, 8))
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], [t.valid_length for t in trajs], None, 4)
    with torch.no_grad():
        est = get_estimator("coupled")(policy, inp, seed=5, t_min=0.2, t_max=0.8, full_mask_view=True)
    draws = draw_masks("coupled", [8, 8], [t.request_id for t in trajs], base_seed=5, t_min=0.2, t_max=0.8)
    for b, (traj, draw) in enumerate(zip(trajs, draws, strict=True)):
        t = float(draw.t[0])
        first = draw.masks[0]
        assert 0.2 <= t <= 0.8 and torch.equal(draw.masks[1], ~first)
        full = _one_forward_logp(policy, traj.prompt_ids, traj.response_ids, torch.ones(8, dtype=torch.bool))
        view1 = _one_forward_logp(policy, traj.prompt_ids, traj.response_ids, first)
        view2 = _one_forward_logp(policy, traj.prompt_ids, traj.response_ids, ~first)
        for j in range(8):
            mixed = view1[j] / t if first[j] else view2[j] / (1 - t)
            assert float(est.token_logp[b, j]) == pytest.approx(float((full[j] + mixed) / 2), rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------------------------------- 4. SPG
def test_spg_elbo_divides_by_the_sequence_length_not_the_masked_count():
    """SPG per-token ELBO: sum_k sum_j w_kj lp_kj over the tokens through the first EOS / their number, whatever
    the draws masked; loss -A s weighted by length (released code); A > 0 only (pure ELBO)."""
    g = torch.Generator().manual_seed(11)
    b, k, length = 4, 2, 8
    valid = torch.tensor([8, 5, 3, 6])
    mask = torch.arange(length)[None, :] < valid[:, None]
    mc_logp = (-torch.rand(b, k, length, generator=g, dtype=torch.float64) * 2).requires_grad_()
    masked = torch.rand(b, k, length, generator=g) < 0.4
    masked[:, :, 0] = True
    weights = torch.where(masked, torch.rand(b, k, length, generator=g, dtype=torch.float64) + 0.5, 0.0)
    adv = torch.tensor([0.7, 1.2, 0.3, 2.0], dtype=torch.float64)
    loss, _ = compute_loss("spg", PolicyBatch(advantages=adv, token_mask=mask),
                           PolicyEstimates(mc_logp=mc_logp, mc_weights=weights, observed_mask=masked.any(1)))
    num = den = 0.0
    for i in range(b):
        n = int(valid[i])
        elbo = sum(weights[i, q, j] * mc_logp[i, q, j] for q in range(k) for j in range(n) if masked[i, q, j]) / n
        num, den = num - adv[i] * elbo * n, den + n
    assert loss.item() == pytest.approx((num / den).item(), rel=1e-10)


def test_spg_uses_its_block_random_masks_by_default(tiny_model_dirs):
    from launch.recipe_rules import ESTIMATORS_FOR
    from launch.recipe_estimators import BlockRandomEstimator

    assert ESTIMATORS_FOR["spg"][0] == "block_random"
    assert BlockRandomEstimator().params() == {"num_samples": 2, "p_mask": 0.15,  # num_t 2, p_mask_prompt 0.15
                                               "weighting": "released"}
    policy = load_policy(tiny_model_dirs["llada"])
    trajs = _trajectories(policy, 2, length=8, valid=(6, 8))
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], [t.valid_length for t in trajs], None, 4)
    with torch.no_grad():
        est = get_estimator("block_random")(policy, inp, seed=3, num_samples=2, p_mask=0.15)
    for b, traj in enumerate(trajs):
        # The estimator's own masks, recomputed from the sample's generator.
        draw = full = MASK_SAMPLERS.get("block_random")(
            8, sample_generator(3, traj.request_id, 0), block_size=4, num_samples=2,
            prompt_length=traj.prompt_ids.numel(), p_mask=0.15, weighting="released", valid_length=traj.valid_length)
        total = 0.0
        for q in range(2):
            blocks = torch.arange(8) // 4
            chosen = int(blocks[draw.token_weights[q] > 0][0])
            assert draw.masks[q][blocks > chosen].all() and not draw.masks[q][blocks < chosen].any()
            prompt = torch.where(full.prompt_masks[q], policy.spec.mask_token_id, traj.prompt_ids)
            noisy = torch.where(draw.masks[q], policy.spec.mask_token_id, traj.response_ids)
            with torch.no_grad():
                lp = policy.score_responses([prompt], [traj.response_ids], [noisy],
                                            score_mask=[draw.masks[q]]).logprobs[0].double()
            total += sum(float(draw.token_weights[q, i]) * float(lp[i]) for i in range(traj.valid_length))
        assert float(est.seq_logp[b]) == pytest.approx(total, rel=1e-5, abs=1e-5)


def _spg_released_surrogate(lp, masks, valid, adv, beta_e=1.5, mix=0.5):
    """facebookresearch/SPG spg_trainer.py `_get_per_seq_logps` + `compute_loss` for one sample, as plain loops:
    ELBO = mean over forwards of the mean log-prob of that forward's masked tokens through the first EOS; EUBO =
    mean over tokens masked somewhere of log(mean_k p^beta m / t_k) / beta, t_k = masked count / valid length;
    s = ELBO if A > 0 else mix EUBO + (1 - mix) ELBO."""
    k = len(masks)
    elbos, t = [], []
    for q in range(k):
        idx = [j for j in range(valid) if masks[q][j]]
        elbos.append(sum(float(lp[q][j]) for j in idx) / len(idx))
        t.append(len(idx) / valid)
    elbo = sum(elbos) / k
    if adv > 0:
        return elbo
    terms = []
    for j in range(valid):
        avg = sum(math.exp(beta_e * float(lp[q][j])) * bool(masks[q][j]) / t[q] for q in range(k)) / k
        if avg > 0:
            terms.append(math.log(avg))
    return mix * (sum(terms) / len(terms) / beta_e) + (1 - mix) * elbo


def test_spg_block_random_masks_and_bounds_match_the_released_code():
    """SPG's block_random forward process (spg_trainer.py forward_process): block chosen among the blocks holding
    the completion, l ~ U{1..valid tokens of the block} masked there, later blocks and everything after the first
    EOS masked, earlier blocks clean; then the released ELBO / EUBO / length-weighted loss on those masks."""
    g = torch.Generator().manual_seed(4)
    length, block, k = 12, 4, 2
    seen_counts: dict[int, set[int]] = {}
    for trial in range(300):
        valid = [1, 3, 4, 6, 9, 12][trial % 6]
        draw = MASK_SAMPLERS.get("block_random")(length, sample_generator(9, f"r{trial}", 0), block_size=block,
                                                 num_samples=k, weighting="released", valid_length=valid)
        for q in range(k):
            m = draw.masks[q].tolist()
            assert all(m[j] for j in range(valid, length))  # everything after the first EOS is masked
            chosen = next(j for j in range(valid) if m[j]) // block
            assert chosen <= (valid - 1) // block  # a block holding completion tokens
            assert not any(m[j] for j in range(chosen * block))  # earlier blocks clean
            assert all(m[j] for j in range((chosen + 1) * block, length))  # later blocks fully masked
            in_block = [j for j in range(chosen * block, min((chosen + 1) * block, valid))]
            n_masked = sum(m[j] for j in in_block)
            assert 1 <= n_masked <= len(in_block)
            seen_counts.setdefault(len(in_block), set()).add(n_masked)
    for n, counts in seen_counts.items():
        assert counts == set(range(1, n + 1))  # l ~ U{1..n}: every count occurs
    # The loss on those masks equals the released formulas.
    b, valid = 6, torch.tensor([12, 5, 9, 3, 12, 7])
    draws = [MASK_SAMPLERS.get("block_random")(length, sample_generator(2, f"s{i}", 0), block_size=block,
                                               num_samples=k, weighting="released", valid_length=int(valid[i]))
             for i in range(b)]
    masks = torch.stack([d.masks for d in draws])
    lp = -torch.rand(b, k, length, generator=g, dtype=torch.float64) * 3
    adv = torch.tensor([0.8, -0.5, 1.1, -1.2, -0.3, 0.4], dtype=torch.float64)
    token_mask = torch.arange(length)[None, :] < valid[:, None]
    loss, _ = compute_loss("spg", PolicyBatch(advantages=adv, token_mask=token_mask),
                           PolicyEstimates(mc_logp=torch.where(masks, lp, 0.0),
                                           mc_weights=torch.stack([d.token_weights for d in draws]).double()))
    num = den = 0.0
    for i in range(b):
        s = _spg_released_surrogate(lp[i].tolist(), masks[i].tolist(), int(valid[i]), float(adv[i]))
        num, den = num - float(adv[i]) * s * int(valid[i]), den + int(valid[i])
    assert loss.item() == pytest.approx(num / den, rel=1e-6)  # token weights are float32


# ------------------------------------------------------------------------------------------------- 5. wd1
def test_wd1_sums_token_logprobs_per_sequence():
    """wd1: L = -sum_i softmax(A)_i log pi(o_i) + sum_i softmax(-A)_i log pi(o_i), log pi(o_i) = sum of its token
    log-probs through the first EOS (xiaohangt/wd1 rev_grpo_trainer.py), mean over prompts."""
    g = torch.Generator().manual_seed(2)
    b, length = 6, 7
    valid = torch.tensor([7, 2, 5, 1, 6, 4])
    mask = torch.arange(length)[None, :] < valid[:, None]
    logp = (-torch.rand(b, length, generator=g, dtype=torch.float64) * 3).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, _ = compute_loss("wd1", PolicyBatch(advantages=wd1_weights(adv, groups).double(), token_mask=mask),
                           PolicyEstimates(logp=logp))
    expected = 0.0
    for grp in range(2):
        idx = [i for i in range(b) if groups[i] == grp]
        pos = torch.softmax(adv[idx], 0)
        neg = torch.softmax(-adv[idx], 0)
        for q, i in enumerate(idx):
            seq = sum(logp[i, j] for j in range(int(valid[i])))
            expected = expected - pos[q] * seq + neg[q] * seq
    expected = expected / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(expected, logp)[0], atol=1e-6)


# --------------------------------------------------------------------------------------------- 6. CJ-GRPO
def _cj_naive(logp, old, ref, adv, steps, counted, eps=0.5, beta=0.04):
    """yjyddq/EOSER-ASS-RL compute_loss: for each step s, sum over the batch's tokens unmasked at s of
    -min(rho A, clip(rho) A) + beta k3, divided by their number; then / number of steps."""
    b, length = logp.shape
    step_values = sorted({int(steps[i, j]) for i in range(b) for j in range(length) if counted[i, j]})
    total = 0.0
    for s in step_values:
        num, cnt = 0.0, 0
        for i in range(b):
            for j in range(length):
                if counted[i, j] and int(steps[i, j]) == s:
                    rho = torch.exp(logp[i, j] - old[i, j])
                    x = -torch.minimum(rho * adv[i], torch.clamp(rho, 1 - eps, 1 + eps) * adv[i])
                    d = ref[i, j] - logp[i, j]
                    num, cnt = num + x + beta * (torch.exp(d) - d - 1), cnt + 1
        total = total + num / cnt
    return total / len(step_values)


def test_cj_grpo_pools_each_step_across_the_batch():
    g = torch.Generator().manual_seed(5)
    b, length = 4, 8
    logp = (-torch.rand(b, length, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    steps = torch.randint(0, 4, (b, length), generator=g)  # samples differ in how many tokens each step unmasks
    counted = torch.ones(b, length, dtype=torch.bool)  # every decoded token, EOS padding included
    loss, _ = compute_loss("cj_grpo", PolicyBatch(advantages=adv, token_mask=counted, step_ids=steps),
                           PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref))
    expected = _cj_naive(logp, old, ref, adv, steps, counted)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(expected, logp)[0], atol=1e-12)


def test_cj_grpo_learner_trains_the_tokens_after_eos_and_samples_at_temperature_one(tiny_model_dirs):
    from launch.recipe import load_recipe

    assert load_recipe(RECIPES / "cj-grpo-llada-eoser-ass.yaml").rollout.temperature == 1.0
    policy = load_policy(tiny_model_dirs["llada"])
    steps = [torch.tensor([3, 0, 1, 2, 4, 5, 6, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])]
    trajs = _trajectories(policy, 2, length=8, valid=(3, 5), steps=steps)
    learner = Learner(policy, LearnerConfig(algorithm="cj_grpo", estimator="trajectory", mu=1, micro_batch_size=2,
                                            optim=OptimConfig(lr=1e-5)))
    m = learner.update(_scored(trajs))
    assert m["num_tokens"] == 16  # 2 x 8 decoded tokens, not the 3 + 5 through the first EOS


# ----------------------------------------------------------------------------------------- 7. smaller items
def test_learner_logprobs_come_from_raw_logits(tiny_model_dirs):
    """Every reference scores log-probs from raw logits, whatever the rollout's sampling temperature."""
    policy = load_policy(tiny_model_dirs["block"])
    trajs = _trajectories(policy, 2)
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="trajectory", mu=1, micro_batch_size=2,
                                            temperature=0.5, optim=OptimConfig(lr=1e-5)))
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], [t.valid_length for t in trajs],
                         [t.step_map for t in trajs], trajs[0].block_size)
    with torch.no_grad():
        raw = get_estimator("trajectory")(policy, inp).token_logp  # default temperature 1: logits as they are
        tempered = get_estimator("trajectory")(policy, inp, temperature=0.5).token_logp
    learner.update(_scored(trajs))
    for i, t in enumerate(trajs):
        old = learner._old[(0, i)][0]
        n = t.valid_length
        assert torch.allclose(old[:n], raw[i, :n], atol=1e-6)
        assert not torch.allclose(old[:n], tempered[i, :n], atol=1e-3)
    opt = Learner(load_policy(tiny_model_dirs["block"]),
                  LearnerConfig(algorithm="tracerl", temperature=0.5, loss={"logp_temperature": "rollout"}))
    assert opt.score_temperature == 0.5  # the named option scores at the rollout's temperature


def test_tracerl_clamps_the_k3_exponent_as_dllm_rl():
    """train_trado_policy.py: kl = exp(clamp(old - new, -10, 10)) - 1 + (new - old), token sum / L1 per sequence."""
    logp = torch.tensor([[-0.1, -25.0, -3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.2, -1.0, -30.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = make_loss_config("tracerl", clip_eps_low=0.2)
    _, metrics = compute_loss("tracerl", PolicyBatch(advantages=torch.zeros(1, dtype=torch.float64), token_mask=mask),
                              PolicyEstimates(logp=logp, old_logp=old), cfg)
    naive = 0.0
    for j in range(3):
        d = float(logp[0, j].detach()) - float(old[0, j])
        naive += math.exp(max(-10.0, min(10.0, -d))) - 1 + d
    assert metrics["kl"].item() == pytest.approx(naive / 3, rel=1e-9)


@pytest.mark.parametrize("algorithm,mu", [("wd1", 12), ("spg", 4)])
def test_wd1_and_spg_recipes_get_their_published_optimiser_and_sampling(algorithm, mu):
    """xiaohangt/wd1 wd1/train.yaml + run/wll_NP_gsm8k.sh (NUM_ITER 12) and facebookresearch/SPG
    spg/slurm_scripts/train.yaml + spg_mix/gsm_base_spg_mix_beta1.5_weight0.5.sbatch (NUM_ITER 4): d1's optimiser
    (lr 3e-6, Adam betas 0.9 / 0.99, weight decay 0.1, max_grad_norm 0.2), 6 generations, temperature 0.9 (their
    config's default)."""
    from launch.recipe import recipe_from_dict

    recipe = recipe_from_dict({"name": "t", "model": {"tiny": "llada"}, "algorithm": algorithm, "reward": "math",
                               "data": {"task": "arithmetic"}, "rollout": {"max_tokens": 16}})
    ln, ro = recipe.learner, recipe.rollout
    assert (ln.lr, tuple(ln.betas), ln.weight_decay, ln.grad_clip, ln.mu) == (3e-6, (0.9, 0.99), 0.1, 0.2, mu)
    assert (ro.samples_per_prompt, ro.temperature) == (6, 0.9)


def test_d1_recipe_lora_dropout():
    from launch.recipe import load_recipe

    assert load_recipe(RECIPES / "diffu-grpo-llada-gsm8k.yaml").model.lora.dropout == 0.05


def test_recipe_rules_refuse_a_length_margin_that_fails_everything_and_untempered_behaviour_logprobs(tmp_path):
    from launch.recipe import recipe_from_dict
    from launch.recipe_io import deep_merge, read_chain

    base: dict = {"name": "rules"}
    for _, data in read_chain(RECIPES / "tiny-base.yaml"):
        base = deep_merge(base, data)
    with pytest.raises(ValueError, match="algorithm.length_limit_margin"):
        recipe_from_dict(deep_merge(base, {"algorithm": {"length_limit_margin": 16}}))
    with pytest.raises(ValueError, match="algorithm.logp_temperature"):
        recipe_from_dict(deep_merge(base, {"rollout": {"temperature": 0.7}, "trainer": {"off_policy": "behaviour",
                                                                                          "mode": "async"}}))
    ok = recipe_from_dict(deep_merge(base, {"rollout": {"temperature": 0.7},
                                            "algorithm": {"logp_temperature": "rollout"},
                                            "trainer": {"off_policy": "behaviour", "mode": "async"}}))
    assert ok.algorithm.loss_params()["logp_temperature"] == "rollout"
