"""learner.router_aux_loss_coef: the Switch / Qwen-MoE load-balancing loss over real tokens, through the learner."""
from __future__ import annotations

import pytest
import torch

from rl.router_aux import RouterAux, load_balancing_loss, router_aux_for
from rollout.models.loading import load_policy
from rollout.models.tiny import make_tiny_policy

SIZE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16)


def naive_aux(layers: list[torch.Tensor], valid: list[torch.Tensor], k: int) -> float:
    """num_experts * sum_e f_e * P_e, by loops: f_e = share of real (layer, token) pairs routing to e among their
    top k, P_e = mean router probability of e over the same pairs."""
    experts = layers[0].shape[-1]
    pairs = [(lg[t], layer) for layer, (lg, v) in enumerate(zip(layers, valid)) for t in range(lg.shape[0]) if v[t]]
    total = 0.0
    for e in range(experts):
        f = sum(1.0 for row, _ in pairs
                if e in sorted(range(experts), key=lambda j: -float(torch.softmax(row, -1)[j]))[:k]) / len(pairs)
        p = sum(float(torch.softmax(row.double(), -1)[e]) for row, _ in pairs) / len(pairs)
        total += f * p
    return experts * total


def test_formula_matches_naive_and_known_answers():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(10, 6, generator=g) * 2 for _ in range(3)]
    valid = [torch.rand(10, generator=g) > 0.3 for _ in range(3)]
    for k in (1, 2, 3):
        assert load_balancing_loss(layers, valid, k).item() == pytest.approx(naive_aux(layers, valid, k), abs=1e-6)
    # padding counts nowhere: rows marked invalid can be anything
    junk = [torch.where(v[:, None], lg, torch.full_like(lg, 1e4)) for lg, v in zip(layers, valid)]
    assert load_balancing_loss(junk, valid, 2).item() == pytest.approx(naive_aux(layers, valid, 2), abs=1e-6)
    assert load_balancing_loss(layers, [torch.ones(10, dtype=torch.bool)] * 3, 2).item() != pytest.approx(
        naive_aux(layers, valid, 2), abs=1e-4)
    # uniform routing: exactly k; everything on one expert (k=1): num_experts
    flat = [torch.zeros(5, 4)]
    assert load_balancing_loss(flat, [torch.ones(5, dtype=torch.bool)], 2).item() == pytest.approx(2.0)
    peaked = [torch.tensor([[50.0, 0, 0, 0]]).repeat(5, 1)]
    assert load_balancing_loss(peaked, [torch.ones(5, dtype=torch.bool)], 1).item() == pytest.approx(4.0, rel=1e-6)


def test_it_is_transformers_qwen_moe_loss():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    layers = [torch.randn(8, 5, generator=g) for _ in range(2)]
    ours = load_balancing_loss(layers, [mask.reshape(-1).bool()] * 2, 2)
    theirs = load_balancing_loss_func(tuple(layers), 5, 2, mask)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_policy("sdar-moe", tmp_path_factory.mktemp("moe") / "m", seed=5, **SIZE)


def _batch(n_samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 90, (3 + 2 * i,), generator=g) for i in range(n_samples)]
    responses = [torch.randint(10, 90, (4 * (i + 1),), generator=g) for i in range(n_samples)]
    noisy = [torch.where(torch.rand(r.shape, generator=g) < 0.5, torch.full_like(r, 2), r) for r in responses]
    return prompts, responses, noisy


def test_recorded_over_real_tokens_only(moe_dir):
    """A padded batch's loss equals the loss over the samples' own unpadded forwards pooled together."""
    policy = load_policy(moe_dir)
    aux = RouterAux(policy)
    prompts, responses, noisy = _batch(3, 0)
    with aux.recording():
        policy.score_responses(prompts, responses, noisy)
    batched_logits, batched_valid = list(aux._logits), list(aux._valid)
    padded = aux.take()
    assert len(batched_logits) == 2 and not all(bool(v.all()) for v in batched_valid)  # padding was there
    alone_logits, alone_valid = [], []
    for i in range(3):
        with aux.recording():
            policy.score_responses(prompts[i:i + 1], responses[i:i + 1], noisy[i:i + 1])
        alone_logits += aux._logits
        alone_valid += aux._valid
        aux._logits, aux._valid = [], []
    assert all(bool(v.all()) for v in alone_valid)
    pooled = load_balancing_loss(alone_logits, alone_valid, 2)
    assert padded.item() == pytest.approx(pooled.item(), abs=1e-5)
    everything = load_balancing_loss(batched_logits, [torch.ones_like(v) for v in batched_valid], 2)
    assert abs(everything.item() - padded.item()) > 1e-4  # counting the padding would change it
    assert padded.requires_grad  # it trains the routers


def test_off_by_default_and_refused_on_dense_models(moe_dir, tiny_policies):
    assert router_aux_for(load_policy(moe_dir), 0.0) is None
    with pytest.raises(ValueError, match="router_aux_loss_coef: the policy has no mixture-of-experts router"):
        router_aux_for(tiny_policies["sdar"], 0.01)
    with pytest.raises(ValueError, match="router_aux_loss_coef: must be >= 0"):
        router_aux_for(load_policy(moe_dir), -1.0)


def _router_weights(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.causal_lm.named_parameters() if n.endswith("mlp.gate.weight")}


def test_learner_adds_and_logs_it(moe_dir):
    from rl.learner import Learner, LearnerConfig
    from rl.optim import OptimConfig
    from rollout.engine import TorchEngine
    from rollout.sampling import GenerationRequest, SamplingParams
    from rl.sample import ScoredSample

    params = SamplingParams(temperature=1.0, max_tokens=8, remasking="low_confidence_static", stop_at_eos=False)
    base = load_policy(moe_dir)
    trajs = TorchEngine(base).generate([GenerationRequest(torch.randint(10, 90, (n,)), params, seed=n,
                                                          request_id=str(n)) for n in (3, 5, 6, 9)])
    samples = [ScoredSample(t, advantage=a, reward=float(a > 0)) for t, a in zip(trajs, (1.0, -1.0, 1.0, -1.0))]

    def run(coef):
        policy = load_policy(moe_dir)
        config = LearnerConfig(algorithm="tracerl", estimator="trajectory", micro_batch_size=2,
                               loss={"beta": 0.0}, optim=OptimConfig(lr=1e-2), router_aux_loss_coef=coef)
        metrics = Learner(policy, config).update(samples)
        return metrics, _router_weights(policy)

    off, w_off = run(0.0)
    on, w_on = run(1.0)
    assert "router_aux_loss" not in off
    assert torch.isfinite(torch.tensor(on["router_aux_loss"])) and on["router_aux_loss"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in on.values() if isinstance(v, float))
    assert any(not torch.equal(w_off[n], w_on[n]) for n in w_off)  # the aux gradient reached the routers
    # on the first inner step the policy part is the same: only the routers' update differs in kind
    assert on["loss"] == pytest.approx(off["loss"], abs=1e-6)


def test_recipe_field():
    from launch.recipe import RecipeError, load_recipe
    from launch.driver_roles import learner_config

    r = load_recipe("recipes/tiny-tracerl-sdar-moe.yaml")
    assert r.model.tiny == "sdar-moe" and r.model.declared_kind == "sdar"
    assert learner_config(r).router_aux_loss_coef == r.learner.router_aux_loss_coef
    assert load_recipe("recipes/tiny-tracerl.yaml").learner.router_aux_loss_coef == 0.0
    with pytest.raises(RecipeError, match="router_aux_loss_coef"):
        load_recipe("recipes/tiny-tracerl.yaml", ["learner.router_aux_loss_coef=-0.1"])

