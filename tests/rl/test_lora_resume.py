"""Resuming a LoRA learner: rebuilt on the run's initial policy (its frozen base) with fresh adapters of another
initialisation, then the checkpoint's learner state, it continues exactly like the uninterrupted learner: same
policy outputs at the resume point, same update after it (adapters, Adam moments, KL reference = adapters off).
Resuming from the merged checkpoint with fresh adapters instead (the forward is the same) does not continue alike."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

from rl.learner import Learner, LearnerConfig
from rl.learner_shards import load_rank_shard, save_rank_shard
from rl.optim import OptimConfig
from rl.weight_sync import merged_weights
from rollout.models.loading import load_policy, save_policy
from rollout.models.lora import apply_lora

_spec = importlib.util.spec_from_file_location("_learner_tests", Path(__file__).with_name("test_learner.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

# d1's loss with a KL to the reference (for LoRA: the base, adapters off) and two inner updates (Adam state matters)
CONFIG = LearnerConfig(algorithm="diffu_grpo", estimator="one_step", mu=2, optim=OptimConfig(lr=1e-2))


def _lora_learner(path, init_seed: int) -> Learner:
    return Learner(apply_lora(load_policy(path), r=4, alpha=8, seed=init_seed), CONFIG)


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # the checkpoint format: tensors and plain types only


def _merged(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in merged_weights(learner.policy.causal_lm)}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert torch.equal(t, b[name]), name


def test_resumed_lora_learner_continues_like_an_uninterrupted_one(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["block"]
    a = _lora_learner(base, init_seed=0)
    first, second = (_helpers.make_trajectories(a.policy, 4, seed=s, prefix=p) for s, p in ((0, "a"), (1, "b")))
    a.update(first)
    save_rank_shard(a, tmp_path / "learner", 0, 1)  # what the checkpoint's learner/ holds: the rank's own shard
    save_policy(a.policy, tmp_path / "policy")  # what the checkpoint's policy/ holds: merged weights

    b = _lora_learner(base, init_seed=1)  # as the driver resumes: initial policy, fresh adapters, learner shard
    load_rank_shard(b, tmp_path / "learner", 0, 1)
    _assert_same(_merged(a), _merged(b))
    probe = _helpers.make_trajectories(a.policy, 3, seed=5, prefix="p")
    at_resume = _helpers.seq_logp(a.policy, probe)
    assert torch.equal(at_resume, _helpers.seq_logp(b.policy, probe))
    ma, mb = a.update(second), b.update(second)
    _assert_same(_merged(a), _merged(b))
    for key in ("loss", "kl", "grad_norm", "ratio_mean"):
        assert ma[key] == mb[key], key
    assert ma["kl"] > 0

    # The shortcut: the merged checkpoint as base, fresh adapters, fresh optimizer. The same forward at the resume
    # point, but the reference (adapters off) is now the trained policy and the Adam moments are gone.
    c = _lora_learner(tmp_path / "policy", init_seed=1)
    c.updates = 1
    assert torch.allclose(_helpers.seq_logp(c.policy, probe), at_resume, atol=1e-5)
    mc = c.update(second)
    assert mc["kl"] != mb["kl"]
    assert any(not torch.allclose(t, _merged(b)[n]) for n, t in _merged(c).items())


def test_lora_learner_state_is_checked(tiny_model_dirs):
    base = tiny_model_dirs["block"]
    state = _round_trip(_lora_learner(base, 0).state_dict())
    without = {k: v for k, v in state.items() if k != "adapter"}
    with pytest.raises(ValueError, match="adapter missing"):
        _lora_learner(base, 0).load_state_dict(without)
    with pytest.raises(ValueError, match="adapter unexpected"):
        Learner(load_policy(base), CONFIG).load_state_dict(state)
    name = next(n for n in state["adapter"] if n.endswith("lora_A.default.weight"))
    other_r = {**state, "adapter": {**state["adapter"], name: torch.zeros(8, 3)}}
    with pytest.raises(ValueError, match=f"adapter tensor '{name}' has shape"):
        _lora_learner(base, 0).load_state_dict(other_r)
    renamed = {**state, "adapter": {k + "x" if k == name else k: v for k, v in state["adapter"].items()}}
    with pytest.raises(ValueError, match="missing from the checkpoint|not in this LoRA model"):
        _lora_learner(base, 0).load_state_dict(renamed)
