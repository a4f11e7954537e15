"""IGPO's GSPO option (algorithm.sequence_ratio; the released run's use_gspo=true): one clipped ratio per sequence,
s_i = exp(mean of the log-ratios over the response), checked against the equations written per sample (GSPO, Zheng
et al. 2025; facebookresearch/igpo trainer_igpo.py @e85eaea), and on-policy through the learner."""
from __future__ import annotations

import math

import pytest
import torch

from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss, make_loss_config
from rl.estimators.base import EstimatorInput, token_mask_of
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from tests.rl.test_igpo import hinted_samples


def naive_gspo(logp, old, ref, adv, counted, ratio_positions, eps=0.2, beta=0.01):
    """Per sample: s_i = exp((1 / |P_i|) sum_{t in P_i} (logp_it - old_it)) with P_i the ratio's positions;
    each counted token t of i adds -min(s_i A_i, clip(s_i, 1 - eps, 1 + eps) A_i) + beta k3(ref_it, logp_it);
    the total is divided by the number of counted tokens. Scalar torch ops, one sample at a time (for gradients)."""
    total, n = 0.0, 0
    for i in range(len(adv)):
        pos = ratio_positions[i]
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in pos) / len(pos))
        surrogate = -torch.minimum(s * adv[i], torch.clamp(s, 1 - eps, 1 + eps) * adv[i])
        for t in range(logp.shape[1]):
            if counted[i][t]:
                d = ref[i, t] - logp[i, t]
                total = total + surrogate + beta * (torch.exp(d) - d - 1)
                n += 1
    return total / n


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, width = 5, 10
    lengths = [10, 10, 8, 10, 6]  # generation lengths (the learner's batch.lengths)
    frozen = [torch.rand(width, generator=g) < 0.3 for _ in range(b)]
    frozen[1] = None  # no hints
    inp = EstimatorInput([torch.tensor([1])] * b, [torch.zeros(n, dtype=torch.long) for n in lengths], list("abcde"),
                         lengths, frozen=[f if f is None else f[:n] for f, n in zip(frozen, lengths)])
    mask = token_mask_of(inp)
    logp = (torch.randn(b, width, generator=g) - 2).requires_grad_()
    # log-ratios of 0.15 per token give sequence ratios inside and outside [0.8, 1.2]
    old = logp.detach() + 0.15 * torch.randn(b, width, generator=g) + 0.3 * torch.randn(b, 1, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(b, width, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75])
    return inp, mask, logp, old, ref, adv, torch.tensor(lengths)


@pytest.mark.parametrize("mode", ["response", "counted"])
def test_sequence_ratio_equals_naive_gspo_per_sample(mode):
    inp, mask, logp, old, ref, adv, lengths = random_case(3)
    config = make_loss_config("igpo", sequence_ratio=mode)
    loss, metrics = compute_loss("igpo", PolicyBatch(advantages=adv, token_mask=mask, lengths=lengths),
                                 PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref), config)
    counted = mask.tolist()
    if mode == "response":  # the released code: every response position, hints included, / generation length
        positions = [list(range(int(n))) for n in lengths]
    else:
        positions = [[t for t in range(mask.shape[1]) if counted[i][t]] for i in range(len(adv))]
    naive_logp = logp.detach().clone().requires_grad_()
    want = naive_gspo(naive_logp, old, ref, adv, counted, positions)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    want.backward()
    assert torch.allclose(logp.grad, naive_logp.grad, atol=1e-7, rtol=1e-5)
    hint_grad = torch.stack([logp.grad[i, :f.numel()][f].abs().sum() for i, f in enumerate(inp.frozen)
                             if f is not None]).sum()
    if mode == "response":
        assert hint_grad > 0  # the released ratio reads the hints' log-probs
    else:
        assert hint_grad == 0
    # the case exercises the clip: some sequences clipped, not all
    seq_ratio = [math.exp(sum(logp[i, t].item() - old[i, t].item() for t in p) / len(p)) for i, p in enumerate(positions)]
    clipped = [(a > 0 and r > 1.2) or (a < 0 and r < 0.8) for r, a in zip(seq_ratio, adv.tolist())]
    assert any(clipped) and not all(clipped)
    assert float(metrics["clipfrac"]) == pytest.approx(sum(clipped) / len(clipped))


def test_token_level_ratio_stays_the_default():
    assert make_loss_config("igpo").sequence_ratio == "off"
    with pytest.raises(ValueError, match="sequence_ratio='tokens'"):
        make_loss_config("igpo", sequence_ratio="tokens")


@pytest.mark.parametrize("mode", ["off", "response", "counted"])
def test_on_policy_first_step_and_what_the_hints_weigh(tiny_model_dirs, mode):
    """Through the learner: the first inner step is on-policy (sequence ratio exactly 1, nothing clipped). Changing
    the hint tokens leaves the update bit for bit unchanged unless the ratio reads them ("response", the released
    run's GSPO, where a hint's log-prob enters s_i)."""
    from rollout.models.loading import load_policy

    def update(change_hints):
        policy = load_policy(tiny_model_dirs["llada"], block_size=4)
        samples = hinted_samples(policy)
        if change_hints:
            for s in samples:
                traj = s.trajectory
                if traj.prefilled is not None:
                    traj.response_ids = torch.where(traj.prefilled, (traj.response_ids + 7) % 90 + 10,
                                                    traj.response_ids)
        learner = Learner(policy, LearnerConfig(algorithm="igpo", estimator="one_step", estimator_params={"p_mask": 0},
                                                mu=1, micro_batch_size=3, loss={"sequence_ratio": mode},
                                                optim=OptimConfig(lr=1e-3)))
        m = learner.update(samples)
        return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, m

    base, m = update(False)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["clipfrac"] == 0.0 and m["kl"] == 0.0
    assert m["optimizer_steps"] == 1 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    changed, _ = update(True)
    same = all(torch.equal(base[k], changed[k]) for k in base)
    assert same == (mode != "response")


def test_recipe_sets_the_released_gspo_ratio():
    from pathlib import Path

    from launch.recipe import load_recipe

    root = Path(__file__).resolve().parents[2] / "recipes"
    assert load_recipe(root / "igpo-llada-math.yaml").algorithm.sequence_ratio == "response"
    assert load_recipe(root / "tiny-igpo.yaml").algorithm.sequence_ratio == "off"


def naive_token_ppo(logp, old, ref, adv, counted, eps=0.2, beta=0.01):
    """d1's token-level loss written per token: -min(r A, clip(r) A) + beta k3, r = exp(logp - old), token mean."""
    total, n = 0.0, 0
    for i in range(len(adv)):
        for t in range(logp.shape[1]):
            if counted[i][t]:
                r = torch.exp(logp[i, t] - old[i, t])
                d = ref[i, t] - logp[i, t]
                total = total - torch.minimum(r * adv[i], torch.clamp(r, 1 - eps, 1 + eps) * adv[i])
                total = total + beta * (torch.exp(d) - d - 1)
                n += 1
    return total / n


def test_off_is_the_token_level_ratio():
    """sequence_ratio off (the default) keeps d1's per-token ratio, off-policy too (where the two differ)."""
    inp, mask, logp, old, ref, adv, lengths = random_case(5)
    logp, old, ref = logp.detach().double(), old.double(), ref.double()
    config = make_loss_config("igpo")
    loss, _ = compute_loss("igpo", PolicyBatch(advantages=adv, token_mask=mask, lengths=lengths),
                           PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref), config)
    want = naive_token_ppo(logp, old, ref, adv, mask.tolist())
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    counted_loss, _ = compute_loss("igpo", PolicyBatch(advantages=adv, token_mask=mask, lengths=lengths),
                                   PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref),
                                   make_loss_config("igpo", sequence_ratio="counted"))
    assert abs(counted_loss.item() - loss.item()) > 1e-4  # the case tells the two apart


def test_counted_ratio_reads_only_observed_tokens():
    """An estimator that leaves some valid tokens unobserved (observed_mask): "counted" averages the log-ratios over
    the tokens the loss counts (valid and observed), dividing by their number, not the valid ones'."""
    inp, mask, logp, old, ref, adv, lengths = random_case(7)
    g = torch.Generator().manual_seed(1)
    logp, old, ref = logp.detach().double(), old.double(), ref.double()
    observed = torch.rand(mask.shape, generator=g) < 0.7
    counted = mask & observed
    assert bool(counted.any(1).all()) and not torch.equal(counted, mask)
    loss, _ = compute_loss("igpo", PolicyBatch(advantages=adv, token_mask=mask, lengths=lengths),
                           PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref, observed_mask=observed),
                           make_loss_config("igpo", sequence_ratio="counted"))
    c = counted.tolist()
    positions = [[t for t in range(mask.shape[1]) if c[i][t]] for i in range(len(adv))]
    want = naive_gspo(logp, old, ref, adv, c, positions)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("value", ["tokens", "Response", "sequence"])
def test_recipe_misspelled_sequence_ratio_is_a_one_line_error(value):
    from pathlib import Path

    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    root = Path(__file__).resolve().parents[2] / "recipes"
    with pytest.raises(RecipeError) as err:
        load_recipe(root / "tiny-igpo.yaml", overrides=[f"algorithm.sequence_ratio={value}"])
    assert "algorithm.sequence_ratio" in str(err.value) and "\n" not in str(err.value)
