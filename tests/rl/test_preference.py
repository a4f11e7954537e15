"""DPO trainer path (VRPO, dTRPO): the loss vs the paper's equation written naively, the pair layout, the first
step against the reference, VRPO's antithetic sampling (shared masks, lower variance measured on the tiny model),
the VRPO ELBO's exact mean vs enumeration (LLaDA's count form and the paper's time form, the latter also vs a naive
per-timestep re-implementation of LLaDA 1.5's estimator), dTRPO updates from trajectories, pairs built from a trajectory store."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators.base import EstimatorInput
from rl.estimators.elbo import mc_elbo_estimator
from rl.estimators.exact import exact_elbo, exact_expectation, masked_logps
from rl.learner import LearnerConfig
from rl.masking import draw_masks
from rl.optim import OptimConfig
from rl.preference_learner import PreferenceLearner, pair_plan
from rl.preference_pairs import PreferencePair, pair_samples, pairs_from_store
from rl.sample import ScoredSample
from rl.store import StoreError, TrajectoryStore
from rollout.models.loading import load_policy
from rollout.trajectory import Trajectory


# ------------------------------------------------------------------------------------------------ the loss
def naive_dpo(pol_w, ref_w, pol_l, ref_l, beta):
    """LLaDA 1.5's DPO-E, one pair at a time: -log sigma(beta (B_th(y_w) - B_ref(y_w)) - beta (B_th(y_l) - B_ref(y_l)))."""
    out = 0.0
    for a, b, c, d in zip(pol_w, ref_w, pol_l, ref_l, strict=True):
        z = beta * (a - b) - beta * (c - d)
        out += -math.log(1.0 / (1.0 + math.exp(-z)))
    return out / len(pol_w)


@pytest.mark.parametrize("name", ["vrpo", "dtrpo"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_loss_matches_naive_dpo(name, beta):
    g = torch.Generator().manual_seed(0)
    pairs = 5
    seq = (torch.randn(2 * pairs, generator=g, dtype=torch.float64) * 4 - 20).requires_grad_()
    ref = torch.randn(2 * pairs, generator=g, dtype=torch.float64) * 4 - 20
    adv = torch.tensor([1.0, -1.0] * pairs)
    batch = PolicyBatch(advantages=adv, token_mask=torch.ones(2 * pairs, 3, dtype=torch.bool))
    loss, metrics = compute_loss(name, batch, PolicyEstimates(seq_logp=seq, seq_ref_logp=ref),
                                 make_loss_config(name, beta=beta))
    s, r = seq.detach().tolist(), ref.tolist()
    want = naive_dpo(s[0::2], r[0::2], s[1::2], r[1::2], beta)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    margins = [(s[2 * i] - r[2 * i]) - (s[2 * i + 1] - r[2 * i + 1]) for i in range(pairs)]
    assert float(metrics["reward_accuracy"]) == pytest.approx(sum(m > 0 for m in margins) / pairs)
    loss.backward()
    # d loss / d B_th(y_w) = -beta sigma(-z) / P: the chosen rows are pushed up, the rejected ones down
    for i, m in enumerate(margins):
        want_grad = -beta * (1 / (1 + math.exp(beta * m))) / pairs
        assert float(seq.grad[2 * i]) == pytest.approx(want_grad, rel=1e-9)
        assert float(seq.grad[2 * i + 1]) == pytest.approx(-want_grad, rel=1e-9)


def test_loss_normaliser_is_the_minibatch_pair_count():
    seq, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    batch = PolicyBatch(advantages=torch.tensor([1.0, -1.0]), token_mask=torch.ones(2, 1, dtype=torch.bool))
    one, _ = compute_loss("vrpo", batch, PolicyEstimates(seq_logp=seq, seq_ref_logp=ref))
    batch.loss_normalizer = 4.0  # this micro-batch holds 1 of the minibatch's 4 pairs
    part, _ = compute_loss("vrpo", batch, PolicyEstimates(seq_logp=seq, seq_ref_logp=ref))
    assert float(part) == pytest.approx(float(one) / 4)


@pytest.mark.parametrize("adv", [[-1.0, 1.0], [1.0, 1.0], [1.0, -1.0, 1.0]])
def test_pair_layout_is_checked(adv):
    n = len(adv)
    batch = PolicyBatch(advantages=torch.tensor(adv), token_mask=torch.ones(n, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="pairs|alternate"):
        compute_loss("vrpo", batch, PolicyEstimates(seq_logp=torch.zeros(n), seq_ref_logp=torch.zeros(n)))


def test_pair_plan_keeps_pairs_whole_and_visits_each_once():
    plan = pair_plan(7, mu=2, pairs_per_micro=2, grad_accum=2, shuffle=True, seed=3)
    assert len(plan) == 2
    for minibatches in plan:
        seen = sorted(p for mb in minibatches for micro in mb for p in micro)
        assert seen == list(range(7))
        assert all(sum(len(m) for m in mb) <= 4 for mb in minibatches)
    assert plan[0] != plan[1]


# ------------------------------------------------------------------------------------------------ pairs
def text_pair(i: int, g: torch.Generator, *, length: int = 6, block: int = 4, steps: bool = True) -> PreferencePair:
    prompt = torch.randint(10, 90, (4,), generator=g)

    def traj(tag: str) -> Trajectory:
        resp = torch.randint(10, 90, (length,), generator=g)
        step_map = (torch.arange(length) // 2) if steps else torch.zeros(length, dtype=torch.long)
        return Trajectory(prompt_ids=prompt, response_ids=resp, step_map=step_map, logprobs=torch.zeros(length),
                          confidence=torch.zeros(length), valid_length=length, nfe=1, finish_reason="eos",
                          block_size=block, request_id=f"{tag}{i}")

    return PreferencePair(traj("w"), traj("l"), key=f"pair{i}")


def pairs_for(policy, n: int, seed: int = 0, length: int = 6) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)
    return [text_pair(i, g, length=length, block=policy.spec.block_size) for i in range(n)]


def vrpo_config(**kw) -> LearnerConfig:
    base = {"algorithm": "vrpo", "estimator": "mc_elbo", "estimator_params": {"num_samples": 2},
            "micro_batch_size": 2, "optim": OptimConfig(lr=1e-3), "grad_clip": None, "shuffle": False}
    base.update(kw)
    return LearnerConfig(**base)


@pytest.fixture
def llada(tiny_model_dirs):
    return load_policy(tiny_model_dirs["llada"])


def test_first_step_against_the_reference_is_exactly_log2(llada):
    """Policy == reference at the start: with antithetic masks every implicit reward is exactly 0 (the analogue of
    ratio 1 / no clipping), the loss log 2; independent masks give a non-zero margin from noise alone."""
    pairs = pairs_for(llada, 4)
    learner = PreferenceLearner(llada, vrpo_config())
    m = learner.update(pairs)
    assert m["reward_margin"] == 0.0 and m["reward_chosen"] == 0.0 and m["reward_rejected"] == 0.0
    assert m["pair_loss"] == pytest.approx(math.log(2), abs=1e-6)  # float32 log(2)
    assert m["optimizer_steps"] == 1 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0


def test_independent_masks_are_noisy_at_the_first_step(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["llada"])
    learner = PreferenceLearner(policy, vrpo_config(), antithetic=False)
    m = learner.update(pairs_for(policy, 4))
    assert abs(m["reward_margin"]) > 1e-4


def test_antithetic_policy_and_reference_draw_the_same_masks(llada):
    learner = PreferenceLearner(llada, vrpo_config(estimator_params={"num_samples": 4}))
    learner._mask_seed = 123
    pol, ref = learner.mask_seeds()
    keys, lengths = ["a", "b"], [6, 9]
    for d_pol, d_ref in zip(draw_masks("mc_elbo", lengths, keys, base_seed=pol, num_samples=4),
                            draw_masks("mc_elbo", lengths, keys, base_seed=ref, num_samples=4), strict=True):
        assert torch.equal(d_pol.masks, d_ref.masks) and torch.equal(d_pol.t, d_ref.t)
        assert torch.equal(d_pol.token_weights, d_ref.token_weights)
    learner.antithetic = False
    pol, ref = learner.mask_seeds()
    draws = [draw_masks("mc_elbo", lengths, keys, base_seed=s, num_samples=4) for s in (pol, ref)]
    assert any(not torch.equal(a.masks, b.masks) for a, b in zip(*draws))


def _perturbed(policy, scale: float, seed: int):
    """A copy of `policy` with its weights moved by Gaussian noise (a policy near its reference)."""
    other = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.detach().std().clamp(min=1e-3))
    return other


def test_antithetic_sampling_lowers_the_variance_of_the_preference_score(llada):
    """VRPO's claim, measured: the score s = (B_th(y_w) - B_ref(y_w)) - (B_th(y_l) - B_ref(y_l)) over 24 mask seeds
    has a much smaller variance when the reference reuses the policy's masks than with independent masks."""
    policy = _perturbed(llada, 0.05, seed=1)
    pair = pairs_for(llada, 1, seed=7, length=8)[0]
    rows = [pair.chosen, pair.rejected]
    inp = EstimatorInput([t.prompt_ids for t in rows], [t.response_ids for t in rows],
                         [t.request_id for t in rows])
    scores = {True: [], False: []}
    with torch.no_grad():
        for seed in range(24):
            pol = mc_elbo_estimator(policy, inp, seed=seed, num_samples=2).seq_logp
            for anti in (True, False):
                ref = mc_elbo_estimator(llada, inp, seed=seed if anti else 10_000 + seed, num_samples=2).seq_logp
                scores[anti].append(float((pol[0] - ref[0]) - (pol[1] - ref[1])))
    var = {k: torch.tensor(v, dtype=torch.float64).var().item() for k, v in scores.items()}
    assert var[True] < 0.25 * var[False], var
    assert var[True] > 0  # the policy differs from the reference: not a trivially zero score


@pytest.mark.parametrize("stratified", [False, True])
def test_vrpo_elbo_exact_mean_is_the_exact_elbo(llada, stratified):
    """n = 4 timesteps with one mask each on a 4-token response: the estimator's exact mean (each timestep's mask
    sizes, each mask set of that size uniformly, by enumeration) equals the exact ELBO; its Monte Carlo mean agrees
    within 4 standard errors."""
    g = torch.Generator().manual_seed(11)
    prompt, response = torch.randint(10, 90, (3,), generator=g), torch.randint(10, 90, (4,), generator=g)
    length, n = 4, 4
    table = masked_logps(llada, prompt, response, range(length))
    if stratified:  # timestep k draws u in [k/n, (k+1)/n): l = floor(u L) + 1, each l of its stratum equally likely
        draws = [(l, length / (l * n), n / length) for k in range(n)
                 for l in range(k * length // n + 1, (k + 1) * length // n + 1)]
    else:  # every timestep draws l uniformly on 1..L, weight L / (l n)
        draws = [(l, length / (l * n), 1 / length) for _ in range(n) for l in range(1, length + 1)]
    exact = exact_elbo(llada, prompt, response)
    assert exact_expectation(table, length, draws) == pytest.approx(exact, abs=1e-6)
    inp = EstimatorInput([prompt], [response], ["x"])
    with torch.no_grad():
        values = torch.tensor([float(mc_elbo_estimator(llada, inp, seed=s, num_samples=n,
                                                       stratified=stratified).seq_logp[0])
                               for s in range(200)], dtype=torch.float64)
    assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(len(values)) + 1e-6
    assert values.std().item() > 0


def naive_vrpo_elbo(table, masks, times) -> float:
    """LLaDA 1.5's ELBO estimate written from its definition, one timestep at a time: B = E_{t~U[0,1]} E_{y_t ~
    q(.|t, y)} l(y_t, t, y), l = (1/t) sum_i 1[y_t^i = M] log p(y^i | y_t), estimated with n_t timesteps t_j and
    n_yt = 1 masked copy each: (1/n_t) sum_j l(y_t^(j), t_j, y)."""
    total = 0.0
    for mask, t in zip(masks.tolist(), times.tolist(), strict=True):
        masked = tuple(i for i, m in enumerate(mask) if m)
        if masked:  # a copy that masks nothing contributes 0
            total += float(table[masked].sum()) / t
    return total / len(times)


@pytest.mark.parametrize("stratified", [False, True])
def test_vrpo_time_form_elbo_is_the_papers_estimator(llada, stratified):
    """The `mc_elbo` estimator with form="time" (VRPO's recipes) equals LLaDA 1.5's doubly Monte Carlo estimate
    written naively from the draws' timesteps and masks (weights 1/t, not the count form's L/l); the timesteps lie
    in (0, 1] (stratified: one per stratum) and each token is masked with probability t."""
    g = torch.Generator().manual_seed(5)
    prompt, response = torch.randint(10, 90, (3,), generator=g), torch.randint(10, 90, (5,), generator=g)
    table = masked_logps(llada, prompt, response, range(5))
    inp = EstimatorInput([prompt], [response], ["x"])
    n = 4
    for seed in range(6):
        draw = draw_masks("mc_elbo", [5], ["x"], base_seed=seed, num_samples=n, stratified=stratified,
                          form="time")[0]
        with torch.no_grad():
            got = float(mc_elbo_estimator(llada, inp, seed=seed, num_samples=n, stratified=stratified,
                                          form="time").seq_logp[0])
        assert got == pytest.approx(naive_vrpo_elbo(table, draw.masks, draw.t), rel=1e-5, abs=1e-5)
    long = draw_masks("mc_elbo", [4000], ["y"], base_seed=3, num_samples=n, stratified=stratified, form="time")[0]
    t = long.t
    assert bool(((t > 0) & (t <= 1)).all())
    if stratified:  # t_k = 1 - (k + U_k) / n: stratum k is (1 - (k+1)/n, 1 - k/n]
        k = torch.arange(n, dtype=t.dtype)
        assert bool(((t > 1 - (k + 1) / n) & (t <= 1 - k / n)).all())
    frac = long.masks.double().mean(1)
    assert torch.allclose(frac, t, atol=0.04), (frac, t)  # Bernoulli(t): 4000 tokens, s.d. <= 0.008


@pytest.mark.parametrize("stratified", [False, True])
def test_vrpo_time_form_mean_is_the_exact_elbo(llada, stratified):
    """Exact mean of the time form from its definition: a copy masks a given set S of size m with probability
    int_0^1 t^m (1 - t)^(L - m) dt and weighs it 1/t, i.e. weight int_0^1 t^(m-1) (1 - t)^(L-m) dt = B(m, L-m+1) per
    set; summed over the sets this equals the exact ELBO, and 200 seeds of the estimator agree within 4 s.e."""
    g = torch.Generator().manual_seed(13)
    prompt, response = torch.randint(10, 90, (3,), generator=g), torch.randint(10, 90, (4,), generator=g)
    length, n = 4, 4
    table = masked_logps(llada, prompt, response, range(length))
    beta_fn = lambda a, b: math.gamma(a) * math.gamma(b) / math.gamma(a + b)  # noqa: E731
    draws = [(m, 1.0, math.comb(length, m) * beta_fn(m, length - m + 1)) for m in range(1, length + 1)]
    exact = exact_elbo(llada, prompt, response)
    assert exact_expectation(table, length, draws) == pytest.approx(exact, abs=1e-6)
    inp = EstimatorInput([prompt], [response], ["x"])
    with torch.no_grad():
        values = torch.tensor([float(mc_elbo_estimator(llada, inp, seed=s, num_samples=n, stratified=stratified,
                                                       form="time").seq_logp[0])
                               for s in range(200)], dtype=torch.float64)
    assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(len(values)) + 1e-6
    assert values.std().item() > 0


@pytest.mark.parametrize("recipe", ["tiny-vrpo.yaml", "vrpo-llada.yaml"])
def test_vrpo_recipes_use_the_papers_elbo_form(recipe):
    """VRPO's recipes estimate the ELBO as the paper defines it (t ~ U[0,1], Bernoulli(t) masks, weight 1/t),
    n_t = n timesteps with one mask each; LLaDA's count form (l ~ U{1..L}, L/l) is the named option form: count."""
    from pathlib import Path

    from launch.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / recipe)
    params = r.estimator.params()
    assert r.estimator.name == "mc_elbo" and params["form"] == "time", params
    draw = draw_masks("mc_elbo", [50], ["z"], base_seed=0, **params)[0]
    want = (1.0 / (draw.t * params["num_samples"])).float()[:, None].expand_as(draw.token_weights)
    assert torch.equal(draw.token_weights, torch.where(draw.masks, want, torch.zeros(())))


# ------------------------------------------------------------------------------------------------ dTRPO
def test_dtrpo_updates_from_trajectories(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner = PreferenceLearner(policy, LearnerConfig(algorithm="dtrpo", estimator="remasked_step",
                                                      micro_batch_size=2, optim=OptimConfig(lr=1e-3),
                                                      shuffle=False))
    pairs = pairs_for(policy, 3, length=8)
    first = learner.update(pairs)
    assert first["pair_loss"] == pytest.approx(math.log(2), abs=1e-6)  # float32 log(2)  # shared re-masked states: margin exactly 0
    assert first["forwards_ref"] == 2  # one forward per micro-batch (2 + 1 pairs), whatever the steps
    for _ in range(2):
        m = learner.update(pairs)
        assert all(math.isfinite(v) for v in m.values())
    assert m["reward_margin"] > 0  # the preference is learnt
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


# ------------------------------------------------------------------------------------------------ store
def _stored(store_dir, rewards_per_prompt: list[list[float | None]], block: int = 4):
    store = TrajectoryStore(store_dir)
    g = torch.Generator().manual_seed(0)
    samples = []
    for p, rewards in enumerate(rewards_per_prompt):
        prompt = torch.randint(10, 90, (3,), generator=g)
        for j, reward in enumerate(rewards):
            resp = torch.randint(10, 90, (4,), generator=g)
            t = Trajectory(prompt_ids=prompt, response_ids=resp, step_map=torch.tensor([0, 1, 1, 0]),
                           logprobs=torch.rand(4, generator=g).log(), confidence=torch.zeros(4), valid_length=4,
                           nfe=2, finish_reason="eos", block_size=block, policy_version=2, request_id=f"p{p}s{j}")
            reason = "error: boom" if reward is None else ("correct" if reward > 0 else "wrong")
            samples.append(ScoredSample(t, prompt_index=p, sample_index=j, reward=reward or 0.0, reason=reason))
    store.add(3, samples)
    return samples


def test_pairs_from_store_take_best_and_worst_of_each_group(tmp_path):
    samples = _stored(tmp_path / "store", [[0.0, 1.0, 0.5], [1.0, 1.0], [None, 1.0, 0.2]])
    pairs = pairs_from_store(tmp_path / "store", block_size=4)
    assert [p.key for p in pairs] == ["st3-p0", "st3-p2"]  # prompt 1: equal rewards, no preference
    assert pairs[0].chosen.request_id == "p0s1" and pairs[0].rejected.request_id == "p0s0"
    assert pairs[1].chosen.request_id == "p2s1" and pairs[1].rejected.request_id == "p2s2"  # failed one left out
    stored = samples[1].trajectory
    assert torch.equal(pairs[0].chosen.step_map, stored.step_map)
    assert torch.allclose(pairs[0].chosen.logprobs, stored.logprobs)  # behaviour log-probs kept
    assert pairs[0].chosen.policy_version == 2 and pairs[0].margin == pytest.approx(1.0)
    assert len(pair_samples(pairs)) == 4


def test_store_without_preferences_is_a_one_line_error(tmp_path):
    _stored(tmp_path / "store", [[1.0, 1.0]])
    with pytest.raises(StoreError, match="nothing to prefer"):
        pairs_from_store(tmp_path / "store", block_size=4)
    with pytest.raises(StoreError, match="no step_"):
        pairs_from_store(tmp_path / "empty", block_size=4)
    samples = _stored(tmp_path / "other", [[1.0, 0.0]])
    samples[0].prompt_index = None
    TrajectoryStore(tmp_path / "other").add(4, samples)
    with pytest.raises(StoreError, match="row 2 .*prompt_index"):
        pairs_from_store(tmp_path / "other", block_size=4)
    _stored(tmp_path / "nan", [[float("nan"), 1.0, 0.0]])  # max/min over a NaN picked one row as both sides
    with pytest.raises(StoreError, match="row 0 .*p0s0.*not finite"):
        pairs_from_store(tmp_path / "nan", block_size=4)


def _recorded_by(policy, pairs):
    """Set every trajectory's recorded log-probs to what an exact rollout of `policy` would have recorded."""
    from rl.estimators.trajectory import trajectory_estimator

    trajs = [t for p in pairs for t in (p.chosen, p.rejected)]
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], step_maps=[t.step_map for t in trajs],
                         block_size=trajs[0].block_size)
    with torch.no_grad():
        est = trajectory_estimator(policy, inp)
    for b, t in enumerate(trajs):
        t.logprobs = est.token_logp[b, : t.response_length].detach().clone()


def test_dtrpo_stored_reference_equals_the_reference_model(tiny_model_dirs):
    """reference_logp 'stored': the recorded log-probs of data the reference decoded stand in for the reference's
    forward; the update (weights after it) equals the one with the reference model, with no reference forward."""
    results = {}
    for source in ("model", "stored"):
        policy = load_policy(tiny_model_dirs["block"])
        pairs = pairs_for(policy, 3, length=8)
        _recorded_by(policy, pairs)
        learner = PreferenceLearner(policy, LearnerConfig(algorithm="dtrpo", estimator="remasked_step",
                                                          micro_batch_size=2, optim=OptimConfig(lr=1e-2),
                                                          shuffle=False), reference_logp=source)
        m = learner.update(pairs)
        results[source] = (m, {k: v.clone() for k, v in policy.model.state_dict().items()}, learner)
    (m_model, w_model, _), (m_stored, w_stored, learner) = results["model"], results["stored"]
    assert learner.ref_policy is None and m_stored["forwards_ref"] == 0 and m_model["forwards_ref"] == 2
    assert abs(m_stored["reward_margin"]) < 1e-6
    assert m_stored["pair_loss"] == pytest.approx(m_model["pair_loss"], abs=1e-6)
    moved = [k for k in w_model if not torch.equal(w_model[k], w_stored[k])]
    assert all(torch.allclose(w_model[k], w_stored[k], atol=1e-6) for k in w_model), moved


def test_stored_reference_refuses_data_it_cannot_stand_for(tiny_model_dirs):
    policy = load_policy(tiny_model_dirs["block"])
    learner = PreferenceLearner(policy, LearnerConfig(algorithm="dtrpo", estimator="remasked_step",
                                                      micro_batch_size=2), reference_logp="stored")
    pairs = pairs_for(policy, 1, length=8)
    pairs[0].rejected.policy_version = 3
    with pytest.raises(ValueError, match="w0|l0"):
        learner.update(pairs)
    pairs = pairs_for(policy, 1, length=8)
    pairs[0].chosen.sampling = {"temperature": 0.7}
    with pytest.raises(ValueError, match="temperature 0.7"):
        learner.update(pairs)
    with pytest.raises(ValueError, match="decoding context"):
        PreferenceLearner(policy, LearnerConfig(algorithm="vrpo", estimator="mc_elbo"), reference_logp="stored")


def test_store_rows_with_prefilled_hints_are_refused(tmp_path):
    from rollout.trajectory import PREFILLED

    samples = []
    for j, reward in enumerate([1.0, 0.0]):
        t = Trajectory(prompt_ids=torch.tensor([5, 6]), response_ids=torch.tensor([11, 12, 13, 14]),
                       step_map=torch.tensor([PREFILLED, 0, 1, 1]), logprobs=torch.tensor([0.0, -1, -1, -1]),
                       confidence=torch.zeros(4), valid_length=4, nfe=2, finish_reason="eos", block_size=4,
                       request_id=f"s{j}", prefilled=torch.tensor([True, False, False, False]))
        samples.append(ScoredSample(t, prompt_index=0, sample_index=j, reward=reward, reason="x"))
    TrajectoryStore(tmp_path).add(1, samples)
    with pytest.raises(StoreError, match="s0 has pre-filled"):
        pairs_from_store(tmp_path, block_size=4)
