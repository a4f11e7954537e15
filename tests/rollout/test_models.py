"""Model layer: block masks, KV-cache equivalence, training layout, SDAR format, LoRA, bad checkpoints."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from rollout.models.loading import load_policy, save_policy
from rollout.models.masks import attention_bias, prompt_block_ids, sequence_bias, sequence_block_ids
from rollout.models.spec import ModelLoadError

_spec = importlib.util.spec_from_file_location("naive_qwen3", Path(__file__).with_name("naive_qwen3.py"))
naive_qwen3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(naive_qwen3)


def _random_ids(policy, n, seed):
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the special tokens at the start of the small vocabulary.
    return torch.randint(10, len(policy.tokenizer), (n,), generator=g)


def _full_logits(policy, ids, prompt_len, alignment="response"):
    full = not policy.spec.is_block
    bias = sequence_bias(prompt_len, ids.numel() - prompt_len, policy.spec.block_size, full=full,
                         alignment=alignment)
    with torch.no_grad():
        out = policy.forward(ids[None], torch.arange(ids.numel())[None], bias)
    return out.logits[0]


def test_prompt_blocks_end_where_the_response_starts():
    assert prompt_block_ids(6, 4).tolist() == [-2, -2, -1, -1, -1, -1]
    assert sequence_block_ids(3, 8, 4).tolist() == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1]


def test_attention_bias_matches_a_naive_rule():
    blocks = sequence_block_ids(5, 8, 4)[None]
    bias = attention_bias(blocks, blocks, torch.ones_like(blocks, dtype=torch.bool))[0, 0]
    for q in range(13):
        for k in range(13):
            visible = bool(blocks[0, k] <= blocks[0, q])
            assert (bias[q, k] == 0) == visible


def test_later_blocks_never_change_earlier_logits(tiny_policies):
    policy = tiny_policies["block"]
    prompt_len, ids = 5, _random_ids(policy, 5 + 12, seed=0)
    base = _full_logits(policy, ids, prompt_len)
    changed = ids.clone()
    changed[prompt_len + 8:] = _random_ids(policy, 4, seed=1)  # rewrite the last response block
    after = _full_logits(policy, changed, prompt_len)
    assert torch.equal(base[: prompt_len + 8], after[: prompt_len + 8])  # bit-identical
    assert not torch.allclose(base[prompt_len + 8:], after[prompt_len + 8:])


def test_a_token_changes_its_block_mates(tiny_policies):
    policy = tiny_policies["block"]
    prompt_len, ids = 3, _random_ids(policy, 3 + 8, seed=2)
    base = _full_logits(policy, ids, prompt_len)
    changed = ids.clone()
    changed[prompt_len + 5] = (ids[prompt_len + 5] + 7) % len(policy.tokenizer)  # inside block 1
    after = _full_logits(policy, changed, prompt_len)
    for mate in (prompt_len + 4, prompt_len + 6, prompt_len + 7):
        assert not torch.allclose(base[mate], after[mate])
    assert torch.equal(base[: prompt_len + 4], after[: prompt_len + 4])


@pytest.mark.parametrize("kind", ["block", "sdar"])
def test_kv_cached_block_forward_equals_full_forward(tiny_policies, kind):
    policy = tiny_policies[kind]
    bs, prompt_len, n_blocks = policy.spec.block_size, 6, 4
    ids = _random_ids(policy, prompt_len + n_blocks * bs, seed=3)
    full = _full_logits(policy, ids, prompt_len)
    blocks = sequence_block_ids(prompt_len, n_blocks * bs, bs)[None]
    valid = torch.ones_like(blocks, dtype=torch.bool)
    for k in range(n_blocks):
        start = prompt_len + k * bs
        with torch.no_grad():
            # Prefill prompt and clean blocks < k into the cache, then run block k against it.
            prefix = policy.forward(ids[None, :start], torch.arange(start)[None],
                                    attention_bias(blocks[:, :start], blocks[:, :start], valid[:, :start]),
                                    use_cache=True, compute_logits=False)
            q = slice(start, start + bs)
            bias = attention_bias(blocks[:, q], blocks[:, : start + bs], valid[:, : start + bs])
            out = policy.forward(ids[None, q], torch.arange(start, start + bs)[None], bias,
                                 past_key_values=prefix.past_key_values, use_cache=True)
        assert (out.logits[0] - full[q]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
def test_training_layout_equals_separate_forwards(tiny_policies, kind):
    policy = tiny_policies[kind]
    spec, mask = policy.spec, policy.spec.mask_token_id
    bs = spec.block_size if spec.is_block else 4
    prompts = [_random_ids(policy, 5, seed=4), _random_ids(policy, 2, seed=5)]
    responses = [_random_ids(policy, 3 * bs, seed=6), _random_ids(policy, 2 * bs, seed=7)]
    g = torch.Generator().manual_seed(8)
    noisy = [torch.where(torch.rand(r.shape, generator=g) < 0.5, torch.full_like(r, mask), r) for r in responses]
    with torch.no_grad():
        scores = policy.score_responses(prompts, responses, noisy, return_entropy=True)
    assert len(prompts) == len(responses) == len(noisy) > 0
    for b, (prompt, clean, corrupted) in enumerate(zip(prompts, responses, noisy)):
        p = prompt.numel()
        if spec.is_block:
            # Blocks of the canvas [prompt tail | response] (sdar: absolute alignment, so the tail is in block 0;
            # tests/rollout/test_block_alignment.py checks both alignments against a naive mask).
            origin = spec.block_origin(p)
            for lo in range(-(p - origin), clean.numel(), bs):
                lo_r, hi = max(lo, 0), min(lo + bs, clean.numel())
                seq = torch.cat([prompt, clean[:lo_r], corrupted[lo_r:hi]])
                logits = _full_logits(policy, seq, p, spec.block_alignment)[p + lo_r: p + hi]
                ref = torch.log_softmax(logits, -1).gather(-1, clean[lo_r:hi, None]).squeeze(-1)
                assert (scores.logprobs[b, lo_r:hi] - ref).abs().max().item() <= 1e-5
        else:
            seq = torch.cat([prompt, corrupted])
            logits = _full_logits(policy, seq, p)
            rows = torch.arange(p, p + clean.numel()) - (1 if spec.logits_shift else 0)
            ref = torch.log_softmax(logits[rows], -1).gather(-1, clean[:, None]).squeeze(-1)
            assert (scores.logprobs[b, : clean.numel()] - ref).abs().max().item() <= 1e-5
        assert scores.valid[b].sum().item() == clean.numel()
        assert torch.all(scores.entropy[b, : clean.numel()] > 0)


def test_score_mask_limits_the_scored_positions(tiny_policies):
    policy = tiny_policies["block"]
    prompt, resp = _random_ids(policy, 4, seed=9), _random_ids(policy, 8, seed=10)
    noisy = resp.clone()
    noisy[[1, 6]] = policy.spec.mask_token_id
    only = torch.zeros(8, dtype=torch.bool)
    only[[1, 6]] = True
    with torch.no_grad():
        part = policy.score_responses([prompt], [resp], [noisy], score_mask=[only])
        whole = policy.score_responses([prompt], [resp], [noisy])
    assert part.valid[0].tolist() == only.tolist()
    assert torch.allclose(part.logprobs[0, only], whole.logprobs[0, only], atol=1e-6)
    assert torch.all(part.logprobs[0, ~only] == 0)


def test_sdar_weights_map_onto_qwen3_exactly(tiny_model_dirs, tiny_policies):
    """A plain re-implementation reading the raw SDAR safetensors agrees with the loaded policy."""
    policy, model_dir = tiny_policies["sdar"], tiny_model_dirs["sdar"]
    prompt_len, ids = 5, _random_ids(policy, 5 + 8, seed=11)
    ours = _full_logits(policy, ids, prompt_len)
    blocks = sequence_block_ids(prompt_len, 8, 4)
    allowed = blocks[None, :] <= blocks[:, None]
    ref = naive_qwen3.naive_qwen3_logits(model_dir, ids, torch.arange(ids.numel()), allowed)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sdar_round_trip(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["sdar"]
    policy = load_policy(src)
    assert policy.spec.kind == "sdar" and policy.spec.block_size == 4
    ids = _random_ids(policy, 13, seed=12)
    before = _full_logits(policy, ids, 5)
    (tmp_path / "src").mkdir()
    out = save_policy(policy, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "sdar" and config["architectures"] == ["SDARForCausalLM"]
    assert config["auto_map"] == original["auto_map"]
    again = load_policy(out)
    assert again.spec == policy.spec
    assert torch.equal(before, _full_logits(again, ids, 5))
    text = "12+34=46\n"
    assert again.tokenizer(text)["input_ids"] == policy.tokenizer(text)["input_ids"]
    assert again.tokenizer.decode(again.tokenizer(text)["input_ids"]) == text


def test_qwen_vocabulary_tiny_sdar(tmp_path):
    from rollout.models.tiny import make_tiny_policy

    path = make_tiny_policy("sdar", tmp_path / "q", vocab="qwen", hidden_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=1, intermediate_size=32)
    policy = load_policy(path)
    assert policy.spec.mask_token_id == 151669  # TraDo's <|MASK|>
    assert policy.spec.eos_token_id == 151643
    assert policy.tokenizer("Hello world")["input_ids"] == [9707, 1879]  # Qwen's own ids


def test_lora_starts_as_identity_and_merges_on_save(tiny_model_dirs, tmp_path):
    from rollout.models.lora import apply_lora, lora_state

    policy = apply_lora(load_policy(tiny_model_dirs["block"]), r=4, alpha=8)
    ids = _random_ids(policy, 9, seed=13)
    base = _full_logits(load_policy(tiny_model_dirs["block"]), ids, 5)
    assert torch.allclose(_full_logits(policy, ids, 5), base, atol=1e-6)
    with torch.no_grad():
        for tensor in lora_state(policy).values():
            tensor.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    tuned = _full_logits(policy, ids, 5)
    assert not torch.allclose(tuned, base, atol=1e-4)
    reloaded = load_policy(save_policy(policy, tmp_path / "merged"))
    assert not any("lora" in k for k in reloaded.causal_lm.state_dict())
    assert torch.allclose(_full_logits(reloaded, ids, 5), tuned, atol=1e-5)
    assert torch.allclose(_full_logits(policy, ids, 5), tuned, atol=1e-6)  # unmerged again after saving


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_dir", "checkpoint directory not found"),
        ("malformed_config", "config.json: malformed JSON"),
        ("no_weights", "no weights"),
        ("no_tokenizer", "no tokenizer files"),
        ("no_mask_token", "tokenizer has no mask token"),
        ("unknown_model_type", "is not a known diffusion LM"),
    ],
)
def test_bad_checkpoints_fail_with_one_line_naming_the_file(tiny_model_dirs, tmp_path, breakage, message):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dirs["block"], broken)
    if breakage == "missing_dir":
        shutil.rmtree(broken)
    elif breakage == "malformed_config":
        (broken / "config.json").write_text("{not json")
    elif breakage == "no_weights":
        for f in broken.glob("*.safetensors"):
            f.unlink()
    elif breakage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (broken / name).unlink()
    elif breakage == "no_mask_token":
        (broken / "diffrl.json").write_text(json.dumps({"kind": "block"}))
        cfg = json.loads((broken / "tokenizer_config.json").read_text())
        cfg.pop("mask_token", None)
        cfg["added_tokens_decoder"] = {i: t for i, t in cfg["added_tokens_decoder"].items()
                                       if t["content"] != "<|mask|>"}
        (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
        special = json.loads((broken / "special_tokens_map.json").read_text())
        special.pop("mask_token")
        (broken / "special_tokens_map.json").write_text(json.dumps(special))
        tok = json.loads((broken / "tokenizer.json").read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|mask|>"]
        tok["model"]["vocab"].pop("<|mask|>")
        (broken / "tokenizer.json").write_text(json.dumps(tok))
    elif breakage == "unknown_model_type":
        (broken / "diffrl.json").unlink()
        cfg = json.loads((broken / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_policy(broken)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert str(broken) in text


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_remote_code_checkpoints_need_permission_and_match_native(tmp_path, kind):
    from rollout.models.tiny_remote import make_tiny_remote_code_policy

    path = make_tiny_remote_code_policy(kind, tmp_path / kind)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_policy(path)
    remote = load_policy(path, trust_remote_code=True)
    assert not remote.native and remote.spec.kind == kind
    assert remote.spec.logits_shift == (kind == "dream")
    # The same weights driven natively through our own full-attention mask.
    native_dir = tmp_path / "native"
    shutil.copytree(path, native_dir)
    cfg = json.loads((native_dir / "config.json").read_text())
    for key in ("auto_map", "architectures"):
        cfg.pop(key)
    cfg["model_type"] = "llama"
    (native_dir / "config.json").write_text(json.dumps(cfg))
    (native_dir / "diffrl.json").write_text(json.dumps({"kind": kind}))
    native = load_policy(native_dir)
    assert native.native
    prompts = [_random_ids(native, 4, seed=20), _random_ids(native, 2, seed=21)]
    responses = [_random_ids(native, 6, seed=22), _random_ids(native, 3, seed=23)]
    noisy = [torch.where(torch.arange(r.numel()) % 2 == 0, native.spec.mask_token_id, r) for r in responses]
    with torch.no_grad():
        a = remote.score_responses(prompts, responses, noisy, return_entropy=True)
        b = native.score_responses(prompts, responses, noisy, return_entropy=True)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
