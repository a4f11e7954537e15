"""Learner precision: bf16 weights with fp32 master copies (torch backend), bf16 autocast over fp32 weights.

The figures the tolerances are set from (tiny block model, 4 trajectories, measured on CPU):
- lr 1e-6, one AdamW step: 93.4% of elements move in fp32; with bf16 weights and fp32 masters 93.4% of the master
  elements move (against the bf16 starting weights); with bf16 weights stepped in place only 1.8% (9 of 25 tensors,
  the norm weights whose bf16 ulp at 1.0 is 7.8e-3, not at all).
- 3 updates at lr 1e-6: the masters' displacement vs the fp32 run's: cosine 0.995, relative L2 error 0.10; bf16 in
  place: cosine 0.13, relative error 0.99.
- autocast bf16 over fp32 weights: token log-probs within 2.2e-3 of fp32 (mean |logp| 4.9), losses within 5e-5.
"""
from __future__ import annotations

import importlib.util
import io
from functools import partial
from pathlib import Path

import pytest
import torch

import rl.learner_backend
from rl.estimators import get_estimator
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rollout.models.loading import load_policy

_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_trajectories, _inp = _helpers.make_trajectories, _helpers._inp


def _policy(path, dtype):
    """The tiny policy with bf16-representable weights in `dtype`: both precisions start from the same values."""
    pol = load_policy(path, dtype=torch.bfloat16)
    pol.model.to(dtype)
    return pol


def _held(learner) -> dict[str, torch.Tensor]:
    """The weights the learner steps, in fp32: the masters of low-precision params, the params themselves else."""
    params = dict(learner.policy.model.named_parameters())
    masters = {id(p): m for p, m in learner.backend.masters.pairs} if learner.backend.masters else {}
    return {k: masters.get(id(p), p).detach().float().clone() for k, p in params.items()}


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.flatten() for _, w in sorted(weights.items())])


def _train(path, dtype, lr, updates, *, masters=True, mu=1, monkeypatch=None):
    if not masters:
        monkeypatch.setattr(rl.learner_backend, "TorchBackend",
                            partial(rl.learner_backend.TorchBackend, master_weights=False))
    pol = _policy(path, dtype)
    start = _flat({k: p.detach().float().clone() for k, p in pol.model.named_parameters()})
    learner = Learner(pol, LearnerConfig(algorithm="tracerl", mu=mu, optim=OptimConfig(lr=lr)))
    trajs = make_trajectories(pol, 4)
    losses = [learner.update(trajs)["loss"] for _ in range(updates)]
    if not masters:
        monkeypatch.undo()
    return learner, start, _flat(_held(learner)) - start, losses


def test_bf16_weights_one_step_at_lr_1e6_moves_the_fp32_masters(tiny_model_dirs, monkeypatch):
    path = tiny_model_dirs["block"]
    learner, start, delta, _ = _train(path, torch.bfloat16, 1e-6, 1)
    assert learner.backend.masters is not None
    assert len(learner.backend.masters.pairs) == sum(1 for p in learner.policy.model.parameters())
    moved = float((delta != 0).float().mean())
    assert moved >= 0.9, f"fp32 masters: {moved:.3f} of elements moved in one step at lr 1e-6"
    for p, master in learner.backend.masters.pairs:  # the model is its masters rounded to nearest
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(p.detach(), master.to(torch.bfloat16))
    # The same step on the bf16 params in place (no masters): what this test exists to catch.
    _, _, delta_inplace, _ = _train(path, torch.bfloat16, 1e-6, 1, masters=False, monkeypatch=monkeypatch)
    assert float((delta_inplace != 0).float().mean()) < 0.05


def test_bf16_masters_track_the_fp32_run(tiny_model_dirs, monkeypatch):
    """3 updates at lr 1e-6: the masters move as the fp32 weights do; at lr 1e-3 (where bf16 forwards see the
    weights move) the losses follow the fp32 run's."""
    path = tiny_model_dirs["block"]
    _, _, ref, _ = _train(path, torch.float32, 1e-6, 3)
    _, _, mine, _ = _train(path, torch.bfloat16, 1e-6, 3)
    _, _, inplace, _ = _train(path, torch.bfloat16, 1e-6, 3, masters=False, monkeypatch=monkeypatch)

    def cos(a):
        return float(torch.nn.functional.cosine_similarity(a, ref, dim=0))

    assert cos(mine) >= 0.98 and float((mine - ref).norm() / ref.norm()) <= 0.2
    assert cos(inplace) < 0.5  # stepping bf16 in place: most of the update rounds away
    _, _, _, loss_ref = _train(path, torch.float32, 1e-3, 3, mu=2)
    _, _, _, loss_bf16 = _train(path, torch.bfloat16, 1e-3, 3, mu=2)
    assert loss_ref[0] != loss_ref[-1]  # the loss moves over the run
    for a, b in zip(loss_bf16, loss_ref, strict=True):
        assert abs(a - b) <= 0.05 * abs(b) + 1e-4, (loss_bf16, loss_ref)


def test_bf16_masters_resume_bitwise(tiny_model_dirs):
    path = tiny_model_dirs["block"]
    cfg = LearnerConfig(algorithm="tracerl", mu=2, micro_batch_size=2, optim=OptimConfig(lr=1e-5))
    pol_a = _policy(path, torch.bfloat16)
    first, second = make_trajectories(pol_a, 4, prefix="a"), make_trajectories(pol_a, 4, seed=1, prefix="b")
    a = Learner(pol_a, cfg)
    a.update(first)
    masters = [m.clone() for _, m in a.backend.masters.pairs]
    # The masters carry bits the bf16 weights do not: a resume from the weights alone would differ.
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    pol_b = _policy(path, torch.bfloat16)
    pol_b.model.load_state_dict(pol_a.model.state_dict())  # what the checkpoint's HF directory holds
    b = Learner(pol_b, cfg)
    b.load_state_dict(state)
    assert all(torch.equal(m, mb) for m, (_, mb) in zip(masters, b.backend.masters.pairs, strict=True))
    a.update(second)
    b.update(second)
    for (pa, ma), (pb, mb) in zip(a.backend.masters.pairs, b.backend.masters.pairs, strict=True):
        assert torch.equal(ma, mb) and torch.equal(pa, pb)
    fp32 = Learner(_policy(path, torch.float32), cfg)
    with pytest.raises(ValueError, match=r"fp32_masters unexpected \(.* resume with the same model.dtype"):
        fp32.load_state_dict(state)
    with pytest.raises(ValueError, match=r"fp32_masters missing \(saved by a learner with fp32 weights"):
        b.load_state_dict(fp32.state_dict())  # a CPU (float32) run resumed on GPUs (bfloat16 by default)


def test_bf16_lora_keeps_masters_of_the_adapters_only(tiny_model_dirs):
    from rollout.models.lora import apply_lora

    pol = apply_lora(_policy(tiny_model_dirs["block"], torch.bfloat16), r=4, alpha=8)
    trainable = [p for p in pol.model.parameters() if p.requires_grad]
    # PEFT keeps adapters in fp32 over a bf16 base: nothing needs a master copy.
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert Learner(pol, LearnerConfig(algorithm="tracerl", optim=OptimConfig(lr=1e-6))).backend.masters is None
    for p in trainable:  # bf16 adapters: masters of exactly those, never of the frozen base
        p.data = p.data.to(torch.bfloat16)
    learner = Learner(pol, LearnerConfig(algorithm="tracerl", mu=1, optim=OptimConfig(lr=1e-6)))
    assert [id(p) for p, _ in learner.backend.masters.pairs] == [id(p) for p in trainable]
    base = {k: v.detach().clone() for k, v in pol.model.named_parameters() if not v.requires_grad}
    learner.update(make_trajectories(pol, 2))
    assert all(torch.equal(v, base[k]) for k, v in pol.model.named_parameters() if k in base)
    names = {id(q): n for n, q in pol.model.named_parameters()}
    pairs = learner.backend.masters.pairs
    moved = [not torch.equal(m, p.detach().float()) for p, m in pairs if "lora_B" in names[id(p)]]
    assert moved and all(moved)  # lr 1e-6 moved every B master (A's gradient is 0 while B = 0)


def test_bf16_autocast_over_fp32_weights_close_to_fp32(tiny_model_dirs):
    path = tiny_model_dirs["block"]
    logps, losses, deltas = {}, {}, {}
    for bf16 in (False, True):
        pol = load_policy(path)
        trajs = make_trajectories(pol, 4)
        w0 = _flat({k: p.detach().clone() for k, p in pol.model.named_parameters()})
        learner = Learner(pol, LearnerConfig(algorithm="tracerl", mu=2, bf16=bf16, optim=OptimConfig(lr=1e-3)))
        with torch.no_grad(), learner._autocast():
            logps[bf16] = get_estimator("trajectory")(pol, _inp(trajs)).token_logp
        losses[bf16] = [learner.update(trajs)["loss"] for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in pol.model.parameters()) and learner.backend.masters is None
        deltas[bf16] = _flat({k: p.detach() for k, p in pol.model.named_parameters()}) - w0
    assert logps[True].dtype == torch.float32
    assert not torch.equal(logps[True], logps[False])  # autocast really ran the matmuls in bf16
    torch.testing.assert_close(logps[True], logps[False], rtol=0, atol=1e-2)
    for a, b in zip(losses[True], losses[False], strict=True):
        assert abs(a - b) <= 0.01 * abs(b) + 1e-5, (losses[True], losses[False])
    assert float(torch.nn.functional.cosine_similarity(deltas[True], deltas[False], dim=0)) >= 0.99


# ------------------------------------------------------------------------------------------ reference placement
def _ref_config(**overrides) -> LearnerConfig:
    base = {"algorithm": "tracerl", "mu": 2, "micro_batch_size": 2, "optim": OptimConfig(lr=1e-3),
            "loss": {"beta": 0.01, "kl_reference": "ref"}}
    return LearnerConfig(**{**base, **overrides})


def test_offloaded_reference_gives_identical_reference_logprobs(tiny_model_dirs):
    path = tiny_model_dirs["block"]
    runs = {}
    for offload in (False, True):
        pol = load_policy(path)
        learner = Learner(pol, _ref_config(offload_reference=offload))
        ref = learner.ref_policy.model
        moves, seen = [], []
        original_to = ref.to
        ref.to = lambda device, *a, **k: (moves.append(torch.device(device)), original_to(device, *a, **k))[1]
        trunk = learner.ref_policy.causal_lm.model  # what DiffusionPolicy.forward calls
        trunk.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).device))
        metrics = [learner.update(make_trajectories(pol, 4, seed=s, prefix=f"s{s}")) for s in range(2)]
        runs[offload] = ({k: v.token_logp for k, v in learner._ref.items()}, metrics,
                         {k: v.detach().clone() for k, v in pol.model.named_parameters()})
        assert next(ref.parameters()).device == torch.device("cpu")  # host memory between updates
        assert seen and all(d == learner.device for d in seen)  # its passes ran on the learner's device
        # offloaded: one round trip per update (device for the passes, host after); else never moved
        assert moves == ([learner.device, torch.device("cpu")] * 2 if offload else [])
    (ref_a, m_a, w_a), (ref_b, m_b, w_b) = runs[False], runs[True]
    assert ref_a.keys() == ref_b.keys() and all(torch.equal(ref_a[k], ref_b[k]) for k in ref_a)
    assert m_b[1]["kl"] > 0 and [m["kl"] for m in m_a] == [m["kl"] for m in m_b]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_offload_reference_without_a_reference_fails_with_one_line(tiny_model_dirs):
    pol = load_policy(tiny_model_dirs["block"])
    with pytest.raises(ValueError, match="learner.offload_reference: nothing to offload, this run has no reference"):
        Learner(pol, _ref_config(loss={"beta": 0.0}, offload_reference=True))
