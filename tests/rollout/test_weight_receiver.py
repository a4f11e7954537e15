"""The rollout side of weight sync through TorchEngine.update_weights (no rl import): row slices reassemble
exactly, LoRA triples merge onto the pristine base, and every malformed update fails with one line naming the
tensor while the policy version stays put."""
from __future__ import annotations

import itertools

import pytest
import torch

from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.weight_format import lora_delta, slice_name

PROJ = "model.layers.0.mlp.up_proj"


@pytest.fixture()
def engine(tiny_model_dirs):
    return TorchEngine.from_dir(tiny_model_dirs["block"])  # a private copy: tests here change its weights


@pytest.fixture(scope="module")
def target(tiny_model_dirs) -> dict[str, torch.Tensor]:
    """Named parameters of a perturbed copy of the tiny block model (what a learner would send)."""
    policy = load_policy(tiny_model_dirs["block"])
    g = torch.Generator().manual_seed(3)
    return {n: (p.detach() + 0.01 * torch.randn(p.shape, generator=g)) for n, p in policy.model.named_parameters()}


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in engine.policy.causal_lm.named_parameters()}


def _sliced(name: str, tensor: torch.Tensor, cuts: list[int]) -> list[tuple[str, torch.Tensor]]:
    edges = [0, *cuts, tensor.shape[0]]
    return [(slice_name(name, a, b), tensor[a:b].clone()) for a, b in itertools.pairwise(edges)]


def _lora(rows: int, cols: int, r: int = 2, seed: int = 0, scaling: float = 1.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{PROJ}.lora_A": torch.randn(r, cols, generator=g), f"{PROJ}.lora_B": torch.randn(rows, r, generator=g),
            f"{PROJ}.lora_scaling": torch.tensor(scaling, dtype=torch.float64)}


def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_row_slices_in_any_order_and_chunking_reassemble_exactly(engine, target):
    entries = []
    for name, t in target.items():  # every tensor with >= 3 rows cut in three, the rest whole
        entries += _sliced(name, t, [1, t.shape[0] // 2]) if t.dim() and t.shape[0] >= 3 else [(name, t)]
    entries = entries[1::2] + entries[0::2]  # slices of one tensor arrive in separate, out-of-order chunks
    half = len(entries) // 2
    engine.update_weights(entries[:half], version=4, final=False)
    assert engine.policy_version == 0
    engine.update_weights([dict(entries[half:])], version=4, final=True)
    assert engine.policy_version == 4 and (engine.sync_stats.tensors, engine.sync_stats.chunks) == (len(entries), 2)
    for name, p in _params(engine).items():
        assert torch.equal(p, target[name]), name


def test_lora_triples_merge_onto_the_pristine_base_without_drift(engine):
    base = _params(engine)[f"{PROJ}.weight"].clone()
    rows, cols = base.shape
    for version, seed in ((1, 0), (2, 1), (3, 1)):
        delta = _lora(rows, cols, seed=seed)
        engine.update_weights(delta, version)
        want = base + lora_delta(delta[f"{PROJ}.lora_B"], delta[f"{PROJ}.lora_A"], 1.5)
        assert torch.equal(_params(engine)[f"{PROJ}.weight"], want), version
    assert engine.policy_version == 3


def test_strict_errors_name_the_tensor_and_keep_the_version(engine, target):
    name = f"{PROJ}.weight"
    t = target[name]
    full = dict(target)
    cases = [
        (lambda: engine.update_weights({"model.nope": torch.zeros(1)}, 1), "unknown parameter 'model.nope'"),
        (lambda: engine.update_weights({**full, name: t[:-1]}, 1), repr(name), "has shape"),
        (lambda: engine.update_weights([*full.items(), *_sliced(name, t, [2])[:1]], 1), repr(name), "twice"),
        (lambda: engine.update_weights({n: v for n, v in full.items() if n != name}, 1), "never arrived", repr(name)),
        (lambda: engine.update_weights({slice_name(name, 0, t.shape[0] + 1): t}, 1), repr(name), "outside"),
        (lambda: engine.update_weights({slice_name(name, 0, 2): t[:3]}, 1), f"{name}@0:2", "has shape"),
    ]
    for call, *needles in cases:
        _one_line_error(call, *needles)
    # a missing slice: the tensor, what arrived and which rows are missing
    parts = _sliced(name, t, [2, 5])
    others = [(n, v) for n, v in full.items() if n != name]
    _one_line_error(lambda: engine.update_weights(others + [parts[0], parts[2]], 1), repr(name),
                    f"received only {t.shape[0] - 3} of {t.shape[0]} rows", "rows 2:5 missing")
    # chunks of two versions in one update, and a final call for another version
    engine.update_weights(others[:3], 5, final=False)
    _one_line_error(lambda: engine.update_weights(others[3:4], 6, final=False), "version 6", "update to 5")
    engine.update_weights(full, 5, final=False)
    _one_line_error(lambda: engine.update_weights({}, 7), "version 7", "update to 5")
    assert engine.policy_version == 0
    engine.update_weights(full, 2)  # after any failure a complete update goes through
    assert engine.policy_version == 2


def test_a_lora_part_survives_its_bucket_buffer_being_reused(engine):
    """A LoRA triple may span buckets, and the CUDA IPC path reuses one bucket buffer for the next bucket: a part
    waiting for the rest of its triple must not be a view of that buffer (else the merge reads the next bucket)."""
    base = _params(engine)[f"{PROJ}.weight"].clone()
    delta = _lora(*base.shape)
    a_name = f"{PROJ}.lora_A"
    buffer = delta[a_name].clone()  # the shared bucket buffer, holding lora_A for the first bucket
    engine.update_weights([(a_name, buffer)], 1, final=False)
    buffer.zero_()  # the sender packs the next bucket into the same buffer
    engine.update_weights([(n, t) for n, t in delta.items() if n != a_name], 1, final=True)
    want = base + lora_delta(delta[f"{PROJ}.lora_B"], delta[a_name], 1.5)
    assert torch.equal(_params(engine)[f"{PROJ}.weight"], want)


def test_lora_updates_are_checked(engine):
    rows, cols = _params(engine)[f"{PROJ}.weight"].shape
    lora = _lora(rows, cols)
    a_name = f"{PROJ}.lora_A"
    _one_line_error(lambda: engine.update_weights({a_name: lora[a_name]}, 1), f"LoRA '{PROJ}' incomplete")
    _one_line_error(lambda: engine.update_weights({**lora, f"{PROJ}.lora_B": torch.zeros(rows + 1, 2)}, 1),
                    f"LoRA '{PROJ}'", "do not make a delta")
    _one_line_error(lambda: engine.update_weights({slice_name(a_name, 0, 1): lora[a_name][:1]}, 1), repr(a_name),
                    "travel whole")
    other = "model.layers.1.mlp.up_proj"
    engine.update_weights({**lora, **{k.replace(PROJ, other): v for k, v in lora.items()}}, 1)
    _one_line_error(lambda: engine.update_weights(lora, 2), f"'{other}.weight'", "earlier LoRA updates")
    assert engine.policy_version == 1


def test_a_failed_attempt_is_discarded_before_the_retry(engine, target):
    """A sync attempt that died half way (a peer lost) leaves part of the update applied; the retry resends it all.
    Without discarding, its first tensor 'arrived twice'; after discard_partial_update the retry completes."""
    names = list(target)
    half = {n: target[n] for n in names[: len(names) // 2]}
    engine.update_weights(half, 1, final=False)
    with pytest.raises(ValueError, match="arrived twice"):
        engine.update_weights(half, 1, final=False)  # what the retry hit before the fix (it also resets)
    engine.update_weights(half, 1, final=False)
    engine.discard_partial_update()
    engine.update_weights(target, 1, final=True)
    assert engine.policy_version == 1
    assert all(torch.equal(_params(engine)[n], target[n]) for n in names)
