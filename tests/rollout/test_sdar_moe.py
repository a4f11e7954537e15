"""SDAR-MoE (SDAR-30B-A3B layout) from a tiny original-format checkpoint: weight-name mapping onto transformers'
Qwen3MoeForCausalLM without remote code, forward vs a naive re-implementation, SDAR's generate, cache, save/reload.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout.engine import TorchEngine
from rollout.models.attention import AttentionMask
from rollout.models.loading import load_policy, save_policy
from rollout.models.masks import PAD_BLOCK
from rollout.models.spec import ModelLoadError
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


naive = _load("naive_sdar_moe")
alignment_tests = _load("test_block_alignment")  # SDAR's generate, re-implemented naively (shared reference)

SIZE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16)
# Every MoE rule at once: layer 0 dense (mlp_only_layers), layer 1 MoE, layer 2 dense (off the sparse step of 2),
# layer 3 MoE, top-2 weights not renormalised.
MIXED = {**SIZE, "num_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": (0,), "norm_topk_prob": False}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdar_moe")
    return {"normed": make_tiny_policy("sdar-moe", root / "normed", seed=3, **SIZE),
            "mixed": make_tiny_policy("sdar-moe", root / "mixed", seed=4, **MIXED)}


@pytest.fixture(scope="module")
def moe_policy(moe_dirs):
    return load_policy(moe_dirs["normed"])


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(10, 90, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ format / mapping
def test_checkpoint_is_in_sdar_moe_format_and_loads_natively(moe_dirs, moe_policy):
    d = moe_dirs["normed"]
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "sdar_moe" and config["architectures"] == ["SDARMoeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar_moe.SDARMoeForCausalLM"
    assert not list(d.glob("*.py")) and not (d / "diffrl.json").exists()  # no code to trust, no sidecar
    names = set(load_file(str(d / "model.safetensors")))
    assert {f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert "model.layers.1.mlp.gate.weight" in names and not any("gate_up_proj" in n for n in names)
    assert type(moe_policy.causal_lm).__name__ == "Qwen3MoeForCausalLM"
    assert moe_policy.source == {**moe_policy.source, "format": "sdar_moe", "remote_code": False}
    spec = moe_policy.spec
    assert (spec.kind, spec.block_size, spec.block_alignment) == ("sdar", 4, "absolute")  # SDAR's decoding
    assert spec.mask_token_id == moe_policy.tokenizer.convert_tokens_to_ids("<|MASK|>")


def _edit(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    change(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def _pop(name):
    return lambda w: w.pop(name)


def _set(name, tensor):
    return lambda w: w.__setitem__(name, tensor)


BROKEN = [
    (_pop("model.layers.1.mlp.experts.3.up_proj.weight"), "model.layers.1.mlp.experts.3.up_proj.weight missing"),
    (_set("model.layers.0.mlp.experts.4.gate_proj.weight", torch.zeros(16, 32)), "expert 4 >= num_experts 4"),
    (_set("model.layers.1.mlp.experts.0.down_proj.weight", torch.zeros(16, 32)),
     "model.layers.1.mlp.experts.0.down_proj.weight: shape (16, 32), expected (32, 16)"),
    (_set("model.layers.0.mlp.shared_expert.gate_proj.weight", torch.zeros(16, 32)),
     "unexpected tensor model.layers.0.mlp.shared_expert.gate_proj.weight"),
    (_pop("model.norm.weight"), "model.norm.weight missing"),
    (_set("model.layers.1.mlp.gate.weight", torch.zeros(5, 32)),
     "model.layers.1.mlp.gate.weight: shape (5, 32), expected (4, 32)"),
]


@pytest.mark.parametrize("change, message", BROKEN, ids=[m.split(":")[0][:40] for _, m in BROKEN])
def test_every_tensor_is_mapped_or_refused_in_one_line(moe_dirs, tmp_path, change, message):
    bad = _edit(moe_dirs["normed"], tmp_path / "bad", change)
    with pytest.raises(ModelLoadError) as err:
        load_policy(bad)
    text = str(err.value)
    assert message in text and str(bad) in text and "\n" not in text


def test_layer_layout_rules_are_refused_in_one_line(moe_dirs, tmp_path):
    # An expert tensor on a dense layer (mixed: layer 2 is off the sparse step)
    bad = _edit(moe_dirs["mixed"], tmp_path / "dense", _set("model.layers.2.mlp.experts.0.gate_proj.weight",
                                                             torch.zeros(16, 32)))
    with pytest.raises(ModelLoadError, match="layer 2 is not an MoE layer"):
        load_policy(bad)
    for field in ("norm_topk_prob", "num_experts"):
        d = tmp_path / field
        shutil.copytree(moe_dirs["normed"], d)
        config = json.loads((d / "config.json").read_text())
        del config[field]
        (d / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=f"config.json: {field} missing"):
            load_policy(d)


# -------------------------------------------------------------------------------------------------- forward
def _allowed(n: int, block: int = 4) -> torch.Tensor:
    """SDAR's block-causal visibility with blocks counted from position 0 (written from the rule)."""
    b = torch.arange(n) // block
    return b[None, :] <= b[:, None]


def _padded_forward(policy, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Right-padded batch through the policy with the AttentionMask description (blocks from position 0)."""
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), policy.spec.pad_token_id)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :s.numel()], valid[i, :s.numel()] = s, True
    pos = torch.arange(width).expand(len(seqs), -1)
    block = torch.where(valid, pos // 4, PAD_BLOCK)
    with torch.no_grad():
        logits = policy.forward(ids, pos, AttentionMask.build(block, block, valid)).logits
    return [logits[i, :s.numel()] for i, s in enumerate(seqs)]


@pytest.mark.parametrize("which", ["normed", "mixed"])
def test_forward_equals_naive_sdar_moe(moe_dirs, which, tmp_path):
    policy = load_policy(moe_dirs[which])
    seqs = [_ids(13, 1), _ids(7, 2)]
    ours = _padded_forward(policy, seqs)
    routed = set()
    for seq, got in zip(seqs, ours):
        ref, routes = naive.naive_sdar_moe_logits(moe_dirs[which], seq, torch.arange(seq.numel()),
                                                  _allowed(seq.numel()))
        assert (got - ref).abs().max().item() <= 1e-5
        routed |= {tuple(sorted(r)) for layer in routes for r in layer if r}
    assert len(routed) >= 3, routed  # tokens go to different expert pairs: routing is exercised
    # The comparison can fail: the same weights with norm_topk_prob flipped give other logits.
    flipped = tmp_path / "flipped"
    shutil.copytree(moe_dirs[which], flipped)
    config = json.loads((flipped / "config.json").read_text())
    config["norm_topk_prob"] = not config["norm_topk_prob"]
    (flipped / "config.json").write_text(json.dumps(config))
    other, _ = naive.naive_sdar_moe_logits(flipped, seqs[0], torch.arange(13), _allowed(13))
    assert (other - ours[0]).abs().max().item() > 1e-3
    assert (_padded_forward(load_policy(flipped), seqs[:1])[0] - other).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------- decoding
DECODE_CASES = [c for c in alignment_tests.CASES
                if c.remasking in ("low_confidence_dynamic", "low_confidence_static", "entropy_bounded")]


@pytest.mark.parametrize("kv_cache", ["block", "none"])
@pytest.mark.parametrize("params", DECODE_CASES, ids=lambda p: f"{p.remasking}-T{p.temperature}")
def test_decoding_equals_sdar_generate(moe_policy, params, kv_cache):
    """Token for token (and step for step, log-prob for log-prob) SDAR's block_diffusion_generate, naively
    re-implemented (tests/rollout/test_block_alignment.py), for prompts of every length mod the block."""
    policy = alignment_tests.Sharp(moe_policy)
    prompts = alignment_tests._prompts(policy, lengths=(1, 2, 3, 4, 6, 9))
    seeds = list(range(7, 7 + len(prompts)))
    refs = [alignment_tests.naive_sdar_generate(policy, p, params, s) for p, s in zip(prompts, seeds)]
    out = alignment_tests._decode(policy, prompts, params, kv_cache, seeds)
    assert len(out) == len(refs) == 6
    for traj, ref, prompt in zip(out, refs, prompts):
        alignment_tests._assert_matches_naive(traj, ref, prompt.numel())


def test_cached_decoding_equals_uncached(moe_policy):
    params = SamplingParams(temperature=1.0, max_tokens=16, remasking="low_confidence_dynamic", threshold=0.3,
                            stop_at_eos=False)
    prompts = [_ids(n, n) for n in (3, 5, 8, 11)]

    def run(cache):
        requests = [GenerationRequest(p, params, seed=i, request_id=str(i)) for i, p in enumerate(prompts)]
        return TorchEngine(moe_policy, kv_cache=cache).generate(requests)

    cached, uncached = run("block"), run("none")
    assert len(cached) == len(uncached) == 4
    for a, b in zip(cached, uncached):
        assert a.response_ids.tolist() == b.response_ids.tolist()
        assert a.step_map.tolist() == b.step_map.tolist()
        assert (a.logprobs - b.logprobs).abs().max().item() <= 1e-5


# -------------------------------------------------------------------------------------------------- saving
def test_save_reload_is_identical_and_original(moe_dirs, tmp_path):
    src = moe_dirs["mixed"]
    policy = load_policy(src)
    seqs = [_ids(11, 5)]
    before = _padded_forward(policy, seqs)[0]
    out = save_policy(policy, tmp_path / "saved")
    original, saved = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    config, source = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "block_size"} == \
        {k: v for k, v in source.items() if k != "block_size"}
    assert config["block_size"] == 4
    again = load_policy(out)
    assert again.spec == policy.spec
    assert torch.equal(_padded_forward(again, seqs)[0], before)
    text = "12+34=46\n"
    assert again.tokenizer(text)["input_ids"] == policy.tokenizer(text)["input_ids"]


def test_large_checkpoints_are_sharded_with_an_index(moe_dirs, tmp_path):
    from rollout.models.families import sdar_moe

    policy = load_policy(moe_dirs["normed"])
    state = policy.causal_lm.state_dict()
    out = tmp_path / "sharded"
    out.mkdir()
    sdar_moe.save_weights(state, policy.causal_lm.config, out, max_shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and (out / "model.safetensors.index.json").is_file()
    merged = sdar_moe.read_weights(out)
    assert sorted(merged) == sorted(load_file(str(moe_dirs["normed"] / "model.safetensors")))
