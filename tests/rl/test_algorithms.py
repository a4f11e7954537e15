"""Policy losses against naive per-sample loops; on-policy identities; micro-batch splits with a global normaliser."""
from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import wd1_weights
from rl.algorithms import LOSSES, PolicyBatch, PolicyEstimates, compute_loss, loss_normalizer, make_loss_config
from rl.algorithms.spg import spg_bounds

B, L = 6, 9


def _inputs(seed=0, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([9, 4, 7, 1, 6, 9])
    mask = torch.arange(L)[None, :] < valid[:, None]  # up to and including the first EOS: uneven lengths
    logp = (-torch.rand(B, L, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.4 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, L, generator=g, dtype=torch.float64) if token_adv else torch.randn(B, generator=g,
                                                                                           dtype=torch.float64)
    steps = torch.randint(0, 4, (B, L), generator=g)
    return logp, old, ref, adv, mask, steps


def _kl(lp, target, kind, exp_clamp=None):
    d = target - lp
    e = d if exp_clamp is None else torch.clamp(d, -exp_clamp, exp_clamp)
    return {"k1": -d, "k2": 0.5 * d ** 2, "k3": torch.exp(e) - d - 1}[kind]


def _aggregate_naive(terms, agg, fixed_length=None):
    """terms: per sample, a list of (step, per-token loss)."""
    seqs = [t for t in terms if t]
    if agg == "token_mean":
        return sum(x for t in seqs for _, x in t) / sum(len(t) for t in seqs)
    if agg == "seq_mean_token_sum":
        return sum(sum(x for _, x in t) for t in seqs) / len(seqs)
    if agg == "fixed_length":
        return sum(sum(x for _, x in t) for t in seqs) / (len(seqs) * fixed_length)
    if agg == "seq_mean_token_mean":
        return sum(sum(x for _, x in t) / len(t) for t in seqs) / len(seqs)
    if agg == "seq_mean_step_mean":
        total = 0
        for t in seqs:
            steps = sorted({s for s, _ in t})
            total = total + sum(sum(x for s, x in t if s == st) / sum(1 for s, _ in t if s == st)
                                for st in steps) / len(steps)
        return total / len(seqs)
    if agg == "step_pooled_mean":  # per step: mean over every sample's tokens of that step; mean over steps
        steps = sorted({s for t in seqs for s, _ in t})
        return sum(sum(x for t in seqs for s, x in t if s == st) / sum(1 for t in seqs for s, _ in t if s == st)
                   for st in steps) / len(steps)
    raise AssertionError(agg)


def _naive_token_ppo(logp, old, ref, adv, mask, steps, cfg):
    terms = []
    for i in range(B):
        row = []
        for j in range(L):
            if not mask[i, j]:
                continue
            lr = logp[i, j] - old[i, j]
            if cfg.ratio_clamp is not None:
                lr = torch.clamp(lr, -cfg.ratio_clamp, cfg.ratio_clamp)
            rho = torch.exp(lr)
            a = adv[i, j] if adv.dim() == 2 else adv[i]
            x = -torch.minimum(rho * a, torch.clamp(rho, 1 - cfg.clip_eps_low, 1 + cfg.eps_high) * a)
            if cfg.beta:
                target = ref[i, j] if cfg.kl_reference == "ref" else old[i, j]
                x = x + cfg.beta * _kl(logp[i, j], target, cfg.kl_estimator, cfg.kl_log_ratio_clamp)
            row.append((int(steps[i, j]), x))
        terms.append(row)
    return _aggregate_naive(terms, cfg.loss_agg, cfg.fixed_length)


TOKEN_CASES = [
    ("diffu_grpo", {}, False),
    ("diffu_grpo", {"kl_estimator": "k1", "loss_agg": "seq_mean_token_mean"}, False),
    ("coupled_grpo", {"kl_estimator": "k2", "clip_eps_high": 0.28, "loss_agg": "seq_mean_token_sum"}, False),
    ("tracerl", {}, True),
    ("tracerl", {"kl_reference": "ref", "ratio_clamp": 0.1}, False),
    ("cj_grpo", {}, False),
    ("cj_grpo", {"beta": 0.0}, True),
    ("random_mask_grpo", {"loss_agg": "fixed_length", "fixed_length": 16, "beta": 0.1}, False),
    ("token_ppo", {"clip_eps_low": 0.1, "clip_eps_high": 0.3}, True),
]


@pytest.mark.parametrize("name,overrides,token_adv", TOKEN_CASES)
def test_token_losses_match_naive_loop(name, overrides, token_adv):
    logp, old, ref, adv, mask, steps = _inputs(token_adv=token_adv)
    cfg = make_loss_config(name, **overrides)
    batch = PolicyBatch(advantages=adv, token_mask=mask, step_ids=steps)
    loss, metrics = compute_loss(name, batch, PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref), cfg)
    expected = _naive_token_ppo(logp, old, ref, adv, mask, steps, cfg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    (g1,) = torch.autograd.grad(loss, logp)
    (g2,) = torch.autograd.grad(expected, logp)
    assert torch.allclose(g1, g2, atol=1e-12)
    assert (metrics["pg_loss"] + metrics["kl_loss"]).item() == pytest.approx(loss.item(), rel=1e-10)


def _naive_gdpo(seq, old, ref, adv, lengths, cfg):
    total = 0
    for i in range(B):
        r = torch.exp((seq[i] - old[i]) / lengths[i])
        x = -torch.minimum(r * adv[i], torch.clamp(r, 1 - cfg.clip_eps_low, 1 + cfg.eps_high) * adv[i])
        if cfg.beta:
            x = x + cfg.beta * _kl(seq[i] / lengths[i], ref[i] / lengths[i], "k3")
        total = total + x
    return total / B  # -(1/G) sum over the group(s)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_gdpo_matches_naive(beta):
    logp, old, ref, adv, mask, _ = _inputs(seed=1)
    seq = (logp * mask).sum(1)  # any differentiable (B,) ELBO estimate
    seq_old, seq_ref = (old * mask).sum(1), (ref * mask).sum(1)
    lengths = mask.sum(1).double()
    cfg = make_loss_config("gdpo", beta=beta)
    loss, metrics = compute_loss("gdpo", PolicyBatch(advantages=adv, token_mask=mask, lengths=lengths),
                                 PolicyEstimates(seq_logp=seq, seq_old_logp=seq_old, seq_ref_logp=seq_ref), cfg)
    expected = _naive_gdpo(seq, seq_old, seq_ref, adv, lengths, cfg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    (g_loss,) = torch.autograd.grad(loss, logp, retain_graph=True)
    assert torch.allclose(g_loss, torch.autograd.grad(expected, logp)[0], atol=1e-12)
    ratios = torch.exp((seq_old * 0 + seq.detach() - seq_old) / lengths)
    assert metrics["ratio_max"].item() == pytest.approx(ratios.max().item())


def test_wd1_matches_naive_group_softmax():
    logp, _, _, adv, mask, _ = _inputs(seed=2)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    batch = PolicyBatch(advantages=wd1_weights(adv, groups).double(), token_mask=mask)
    loss, _ = compute_loss("wd1", batch, PolicyEstimates(logp=logp))
    expected = 0
    for g in range(2):
        idx = [i for i in range(B) if groups[i] == g]
        a = adv[idx]
        w_pos, w_neg = torch.softmax(a, 0), torch.softmax(-a, 0)
        for k, i in enumerate(idx):
            seq_logp = logp[i][mask[i]].sum()  # one-step log pi(o_i): the sum of its token log-probs
            expected = expected - w_pos[k] * seq_logp + w_neg[k] * seq_logp
    expected = expected / 2  # mean over prompts
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(expected, logp)[0], atol=1e-7)


def _spg_inputs(seed=3, k=3):
    g = torch.Generator().manual_seed(seed)
    _, _, _, adv, mask, _ = _inputs(seed=seed)
    mc_logp = (-torch.rand(B, k, L, generator=g, dtype=torch.float64) * 2).requires_grad_()
    drawn = torch.rand(B, k, L, generator=g) < 0.5
    drawn[:, :, 0] = True  # every forward masks something
    masked = drawn & mask[:, None, :]
    t = masked.sum(2).double() / mask.sum(1, keepdim=True).double()  # empirical t, as the released code
    weights = torch.where(masked, 1.0 / (k * t[..., None]), 0.0)
    return adv, mask, mc_logp, masked, t, weights


@pytest.mark.parametrize("mix", [1.0, 0.5, 0.0])
def test_spg_matches_released_formulas(mix):
    adv, mask, mc_logp, masked, t, weights = _spg_inputs()
    adv[0], beta_e = 0.0, 1.5  # A = 0 counts as negative
    cfg = make_loss_config("spg", mix=mix)
    loss, metrics = compute_loss("spg", PolicyBatch(advantages=adv, token_mask=mask),
                                 PolicyEstimates(mc_logp=mc_logp, mc_weights=weights), cfg)
    num, den = 0, 0
    for i in range(B):
        n = int(mask[i].sum())
        k = mc_logp.shape[1]
        elbo = sum((mc_logp[i, q][masked[i, q]]).sum() / masked[i, q].sum() for q in range(k)) / k
        avg = [sum(torch.exp(beta_e * mc_logp[i, q, j]) / t[i, q] for q in range(k) if masked[i, q, j]) / k
               for j in range(L)]
        seen = [j for j in range(L) if masked[i, :, j].any()]
        eubo = sum(torch.log(avg[j]) for j in seen) / len(seen) / beta_e
        s = elbo if adv[i] > 0 else mix * eubo + (1 - mix) * elbo
        num, den = num + (-adv[i] * s) * n, den + n
    expected = num / den
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert torch.allclose(torch.autograd.grad(loss, mc_logp)[0], torch.autograd.grad(expected, mc_logp)[0],
                          atol=1e-10)
    assert metrics["frac_positive"].item() == pytest.approx((adv > 0).double().mean().item())


def test_spg_bounds_for_mask_independent_logprobs():
    # lp_kj = lp_j in every forward: ELBO = sum_j lp_j W_j / n and EUBO_j = lp_j + log(W_j) / beta, W_j = sum_k w_kj
    _, mask, _, masked, _, weights = _spg_inputs(k=4)
    lp = -torch.rand(B, 1, L, dtype=torch.float64)
    elbo, eubo = spg_bounds(lp.expand(B, 4, L), weights, mask, beta=1.5)
    w_tot = weights.sum(1)
    for i in range(B):
        seen = masked[i].any(0)
        assert elbo[i].item() == pytest.approx((lp[i, 0] * w_tot[i]).sum().item() / mask[i].sum().item())
        assert eubo[i].item() == pytest.approx((lp[i, 0][seen] + w_tot[i][seen].log() / 1.5).mean().item())


ALL_LOSSES = ["diffu_grpo", "coupled_grpo", "tracerl", "cj_grpo", "random_mask_grpo", "token_ppo", "gdpo", "wd1",
              "spg", "policy_gradient", "espo", "ebpo", "bgpo"]


def _estimates_for(name, logp, old, ref, mask, k=3, seed=9):
    if name in ("gdpo", "espo", "ebpo"):
        return PolicyEstimates(seq_logp=(logp * mask).sum(1), seq_old_logp=(old * mask).sum(1),
                               seq_ref_logp=(ref * mask).sum(1))
    if name in ("spg", "bgpo"):
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(B, k, L, generator=g, dtype=torch.float64) * (torch.rand(B, k, L, generator=g) < 0.6)
        shift = 0.1 * torch.arange(k, dtype=logp.dtype, device=logp.device)[None, :, None]
        return PolicyEstimates(mc_logp=logp[:, None, :] + shift,
                               mc_weights=w)
    return PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref)


def _slice(obj, rows):
    cls = type(obj)
    return cls(**{f: (v[rows] if isinstance(v, torch.Tensor) else v) for f, v in vars(obj).items()})


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_step_mean",
                                 "fixed_length"])
def test_micro_batches_with_global_normalizer_equal_whole_batch(name, agg):
    logp, old, ref, adv, mask, steps = _inputs(seed=4)
    overrides = {"loss_agg": agg, "fixed_length": 12 if agg == "fixed_length" else None}
    cfg = make_loss_config(name, **overrides)
    batch = PolicyBatch(advantages=adv, token_mask=mask, step_ids=steps, lengths=torch.full((B,), float(L)))
    est = _estimates_for(name, logp, old, ref, mask)
    whole, _ = compute_loss(name, batch, est, cfg)
    (g_whole,) = torch.autograd.grad(whole, logp, retain_graph=True)
    splits = [[0, 3], [1], [2, 4, 5]]  # uneven micro-batches, rows in any order
    total = sum(loss_normalizer(mask[s], agg, fixed_length=cfg.fixed_length) for s in splits)
    parts = []
    for s in splits:
        b = _slice(batch, s)
        b.loss_normalizer = total
        parts.append(compute_loss(name, b, _slice(est, s), cfg)[0])
    summed = sum(parts)
    (g_split,) = torch.autograd.grad(summed, logp)
    assert summed.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-14)
    assert torch.allclose(g_split, g_whole, atol=1e-14)


def test_step_pooled_mean_over_micro_batches_is_their_mean():
    """CJ-GRPO's pooling is per call (its reference pools per device batch): with the learner's normaliser (one per
    micro-batch) the split loss is the mean of the micro-batches' pooled losses."""
    logp, old, ref, adv, mask, steps = _inputs(seed=4)
    cfg = make_loss_config("cj_grpo")
    batch = PolicyBatch(advantages=adv, token_mask=mask, step_ids=steps)
    est = PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref)
    splits = [[0, 3], [1], [2, 4, 5]]
    total = sum(loss_normalizer(mask[s], "step_pooled_mean") for s in splits)
    assert float(total) == 3
    alone, parts = [], []
    for s in splits:
        alone.append(compute_loss("cj_grpo", _slice(batch, s), _slice(est, s), cfg)[0])
        b = _slice(batch, s)
        b.loss_normalizer = total
        parts.append(compute_loss("cj_grpo", b, _slice(est, s), cfg)[0])
    assert sum(parts).item() == pytest.approx((sum(alone) / 3).item(), rel=1e-12)


RATIO_LOSSES = ["diffu_grpo", "coupled_grpo", "tracerl", "cj_grpo", "random_mask_grpo", "token_ppo"]


@pytest.mark.parametrize("name", RATIO_LOSSES + ["gdpo"])
@pytest.mark.parametrize("kl_reference", ["ref", "old"])
def test_on_policy_first_step_is_the_plain_policy_gradient(name, kl_reference):
    logp, _, _, adv, mask, steps = _inputs(seed=5, token_adv=name == "tracerl")
    same = logp.detach().clone()
    cfg = make_loss_config(name, kl_reference=kl_reference, beta=0.1)
    batch = PolicyBatch(advantages=adv, token_mask=mask, step_ids=steps, lengths=mask.sum(1).double())
    if name == "gdpo":
        seq = (logp * mask).sum(1)
        est = PolicyEstimates(seq_logp=seq, seq_old_logp=seq.detach(), seq_ref_logp=seq.detach())
        lengths = mask.sum(1).double()
        reference = -(adv * seq / lengths).mean()  # d/dtheta of -A r with r = exp((seq - old)/L) at r = 1
    else:
        est = PolicyEstimates(logp=logp, old_logp=same, ref_logp=same)
        pg_cfg = make_loss_config("policy_gradient", loss_agg=cfg.loss_agg)
        reference, _ = compute_loss("policy_gradient", batch, PolicyEstimates(logp=logp), pg_cfg)
    loss, m = compute_loss(name, batch, est, cfg)
    assert m["ratio_mean"].item() == 1.0 and m["ratio_max"].item() == 1.0 and m["ratio_min"].item() == 1.0
    assert m["clipfrac"].item() == 0 and m["clipfrac_low"].item() == 0 and m["clipfrac_high"].item() == 0
    assert m["kl_loss"].item() == 0 and m["kl"].item() == 0 and m["approx_kl"].item() == 0
    (grad,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (expected,) = torch.autograd.grad(reference, logp)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, expected, atol=1e-12)


def test_metrics_clip_fractions_entropy():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # ratios e^-0.5, e^0.5, 1
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 0.0]], dtype=torch.float64)
    old[1] = torch.tensor([0.5, -0.5, 0.3])  # A<0 with ratio e^-0.5 (low clip); A>0 with e^0.5 (high clip)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    cfg = make_loss_config("token_ppo", clip_eps_low=0.2, clip_eps_high=0.2)
    _, m = compute_loss("token_ppo", PolicyBatch(advantages=adv, token_mask=mask),
                        PolicyEstimates(logp=logp, old_logp=old, entropy=entropy), cfg)
    # counted: (0,0) A+ r=.61 -, (0,1) A+ r=1.65 high, (1,0) A- r=.61 low, (1,1) A+ r=1.65 high, (1,2) A=0
    assert m["clipfrac_high"].item() == pytest.approx(2 / 5) and m["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert m["clipfrac"].item() == pytest.approx(3 / 5)
    assert m["entropy"].item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5)) and m["ratio_min"].item() == pytest.approx(
        math.exp(-0.5))
    assert m["num_tokens"].item() == 5
    for key in ("loss", "pg_loss", "kl_loss", "approx_kl", "ratio_mean", "adv_mean", "adv_std",
                "adv_max", "adv_min"):
        assert key in m
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in m.values())


def test_padding_with_infinite_logprobs_stays_finite():
    logp, old, ref, adv, mask, steps = _inputs(seed=6)
    for name in RATIO_LOSSES + ["wd1"]:
        poisoned = torch.where(mask, logp, torch.tensor(-math.inf, dtype=torch.float64))
        est = PolicyEstimates(logp=poisoned, old_logp=torch.where(mask, old, math.nan), ref_logp=ref)
        loss, _ = compute_loss(name, PolicyBatch(advantages=adv, token_mask=mask, step_ids=steps), est)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name


def test_observed_mask_restricts_random_mask_grpo():
    logp, old, _ref, adv, mask, _ = _inputs(seed=7)
    observed = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.5
    batch = PolicyBatch(advantages=adv, token_mask=mask)
    a, _ = compute_loss("random_mask_grpo", batch, PolicyEstimates(logp=logp, old_logp=old, observed_mask=observed))
    b, m = compute_loss("random_mask_grpo", PolicyBatch(advantages=adv, token_mask=mask & observed),
                        PolicyEstimates(logp=logp, old_logp=old))
    assert a.item() == pytest.approx(b.item()) and m["num_tokens"].item() == (mask & observed).sum().item()


def test_tracerl_ratio_clamp():
    logp, old, _ref, adv, mask, _ = _inputs(seed=8, token_adv=True)
    far = logp.detach() - 50.0  # log-ratio +50: exp would overflow float32; clamped to 10
    _, m = compute_loss("tracerl", PolicyBatch(advantages=adv, token_mask=mask), PolicyEstimates(logp=logp,
                                                                                                 old_logp=far))
    assert m["ratio_max"].item() == pytest.approx(math.exp(10.0))


def test_config_and_registry_errors():
    assert set(ALL_LOSSES) <= set(LOSSES.names())
    with pytest.raises(ValueError, match="unknown option 'eps'"):
        make_loss_config("gdpo", eps=0.1)
    with pytest.raises(ValueError, match="needs fixed_length"):
        make_loss_config("diffu_grpo", loss_agg="fixed_length")
    with pytest.raises(ValueError, match="unknown policy loss 'ppo2'"):
        compute_loss("ppo2", None, None)
    logp, old, ref, adv, mask, _ = _inputs()
    with pytest.raises(ValueError, match="needs batch.step_ids"):
        compute_loss("cj_grpo", PolicyBatch(advantages=adv, token_mask=mask), PolicyEstimates(logp=logp, ref_logp=ref))
    with pytest.raises(ValueError, match="needs estimates.ref_logp"):
        compute_loss("diffu_grpo", PolicyBatch(advantages=adv, token_mask=mask), PolicyEstimates(logp=logp))
    with pytest.raises(ValueError, match="estimates.old_logp shape"):
        compute_loss("tracerl", PolicyBatch(advantages=adv, token_mask=mask),
                     PolicyEstimates(logp=logp, old_logp=old[:, :3]))
    d = make_loss_config("diffu_grpo")
    assert (d.clip_eps_low, d.beta, d.kl_reference, d.loss_agg) == (0.5, 0.04, "ref", "token_mean")
    t = make_loss_config("tracerl")
    assert (t.clip_eps_low, t.beta, t.kl_reference, t.ratio_clamp) == (0.2, 0.01, "old", 10.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_and_value_targets_run_on_cuda():
    from rl.value import compute_value_targets

    logp, old, ref, adv, mask, steps = _inputs(seed=10)
    dev = torch.device("cuda")
    leaf = logp.detach().to(dev).float().requires_grad_()
    for name in ALL_LOSSES:
        est = _estimates_for(name, leaf, old.to(dev).float(), ref.to(dev).float(), mask.to(dev))
        if name == "spg":
            est.mc_weights = est.mc_weights.to(dev).float()
        batch = PolicyBatch(advantages=adv.to(dev).float(), token_mask=mask.to(dev), step_ids=steps.to(dev),
                            loss_normalizer=torch.tensor(40.0, device=dev))
        loss, metrics = compute_loss(name, batch, est)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert loss.device.type == "cuda" and torch.isfinite(grad).all(), name
        assert all(v.device.type == "cuda" or v.dim() == 0 for v in metrics.values())
    out = compute_value_targets(old.to(dev), steps.to(dev), mask.to(dev), adv.to(dev), gamma=0.9, lam=0.8)
    assert out.advantages.device.type == "cuda"
