"""LLaDA2 (inclusionAI's LLaDA2MoeModelLM) from a tiny checkpoint in the released format: forward against a naive
re-implementation from the equations, decoding against LLaDA2's published generate written out naively, cached
against uncached decoding, save -> reload, the learner's recomputation of rollout log-probs, bad checkpoints."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rl.learner import enable_checkpointing
from rollout.engine import TorchEngine
from rollout.models.attention import AttentionMask
from rollout.models.families.llada2 import block_causal_bias
from rollout.models.loading import load_policy, save_policy
from rollout.models.spec import ModelLoadError
from rollout.models.tiny import make_tiny_policy
from rollout.sampling import GenerationRequest, SamplingParams

_spec = importlib.util.spec_from_file_location("naive_llada2", Path(__file__).with_name("naive_llada2.py"))
naive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(naive)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_policy("llada2", tmp_path_factory.mktemp("llada2") / "src", seed=3)


@pytest.fixture(scope="module")
def policy(ckpt):
    return load_policy(ckpt)


@pytest.fixture(scope="module")
def reference(ckpt):
    return naive.NaiveLLaDA2(ckpt)


def test_released_format_and_spec(ckpt, policy):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "llada2_moe" and config["architectures"] == ["LLaDA2MoeModelLM"]
    assert not (ckpt / "diffrl.json").exists()  # nothing diffrl-specific: block 32 and alignment from the kind
    names = set(load_file(str(ckpt / "model.safetensors")))
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
                 "model.layers.0.attention.query_layernorm.weight", "model.layers.0.attention.dense.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.experts.7.down_proj.weight",
                 "model.layers.1.mlp.shared_experts.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert name in names, name
    spec = policy.spec
    assert (spec.kind, spec.block_size, spec.attention, spec.block_alignment) == ("llada2", 32, "block_causal",
                                                                                 "absolute")
    assert spec.mask_token_id == policy.tokenizer.convert_tokens_to_ids("<|mask|>")
    assert policy.native  # diffrl's dispatcher runs its attention (linear-memory kernels)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_equals_the_naive_equations(ckpt, policy, reference, attn):
    if attn != "sdpa":
        policy = load_policy(ckpt, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    length, block = 19, 4
    ids = torch.randint(3, 100, (1, length), generator=g)
    pos = torch.arange(length)[None]
    want = reference.logits(ids[0], naive.block_visibility(length, block))
    with torch.no_grad():
        dense = policy.causal_lm(ids, attention_mask=block_causal_bias(length, block), position_ids=pos).logits[0]
        blocks = (torch.arange(length) // block)[None]
        desc = AttentionMask.build(blocks, blocks, torch.ones_like(blocks, dtype=torch.bool))
        chunked = policy.forward(ids, pos, desc).logits[0]
    assert (dense.double() - want).abs().max() < 1e-5
    assert (chunked.double() - want).abs().max() < 1e-5
    # The comparison sees the routing details: choosing experts without the expert bias changes the logits.
    saved = {k: v.clone() for k, v in reference.w.items() if k.endswith("expert_bias")}
    try:
        for k in saved:
            reference.w[k].zero_()
        unbiased = reference.logits(ids[0], naive.block_visibility(length, block))
    finally:
        reference.w.update(saved)
    assert (unbiased - want).abs().max() > 1e-4


def _generate(policy, prompts, params, kv_cache, seeds=None):
    requests = [GenerationRequest(torch.tensor(p), params, seed=(seeds or [0] * len(prompts))[i], request_id=f"r{i}")
                for i, p in enumerate(prompts)]
    return TorchEngine(policy, kv_cache=kv_cache).generate(requests)


PROMPTS = [[5 + (7 * i) % 90 for i in range(n)] for n in (37, 6, 64)]  # tails of 5, 6 and 0 tokens in block 0
DECODES = [  # (temperature, threshold, steps per block): published 0.95 / 32, and a low threshold hitting both branches
    (0.0, 0.95, 32),
    (0.0, 0.27, 8),
    (1.0, 0.3, 16),
    (0.7, 0.5, 16),  # confidence is the probability under the tempered distribution, not the model's
]


@pytest.mark.parametrize("temperature, threshold, steps", DECODES,
                         ids=["greedy-published", "greedy-low", "sampled", "sampled-tempered"])
def test_decode_equals_the_published_generate(ckpt, policy, reference, temperature, threshold, steps):
    params = SamplingParams(temperature=temperature, max_tokens=64, remasking="threshold_schedule",
                            threshold=threshold, steps_per_block=steps)
    prompts = PROMPTS[:2]
    got = _generate(policy, prompts, params, "block", seeds=[11, 12])
    for prompt, traj, seed in zip(prompts, got, (11, 12)):
        head = len(prompt) % 32
        want = naive.naive_generate(reference, prompt, gen_length=64 - head, block=32, steps=steps,
                                    threshold=threshold, mask_id=policy.spec.mask_token_id,
                                    eos_id=policy.spec.eos_token_id, temperature=temperature,
                                    generator=torch.Generator().manual_seed(seed))
        assert traj.response_ids[:traj.valid_length].tolist() == want


def test_decode_stops_after_the_block_holding_eos_like_the_published_generate(tmp_path, ckpt, reference):
    """Make a token the decode samples in the second block (and not in the first) the eos: diffrl.json overrides the
    tokenizer's, which changes nothing but the stopping, so both decoders must stop after that block and truncate
    after the first eos."""
    params = SamplingParams(temperature=1.0, max_tokens=96, remasking="threshold_schedule", threshold=0.3,
                            steps_per_block=16)
    prompt = PROMPTS[1]
    free = SamplingParams(**{**params.to_dict(), "stop_at_eos": False})
    first = _generate(load_policy(ckpt), [prompt], free, "block", seeds=[7])[0].response_ids.tolist()
    head = len(prompt)
    eos = next(t for t in first[32 - head:64 - head] if t not in first[:32 - head] and t > 2)
    work = tmp_path / "eos"
    shutil.copytree(ckpt, work)
    (work / "diffrl.json").write_text(json.dumps({"eos_token_id": eos}))
    pol = load_policy(work)
    traj = _generate(pol, [prompt], params, "block", seeds=[7])[0]
    want = naive.naive_generate(reference, prompt, gen_length=96 - head, block=32, steps=16, threshold=0.3,
                                mask_id=pol.spec.mask_token_id, eos_id=eos, temperature=1.0,
                                generator=torch.Generator().manual_seed(7))
    assert traj.finish_reason == "eos" and want[-1] == eos
    assert traj.response_ids[:traj.valid_length].tolist() == want
    assert traj.response_ids.numel() == 64 - head  # the third block was never decoded


def test_cached_decoding_equals_uncached(policy):
    params = SamplingParams(temperature=1.0, max_tokens=64, remasking="threshold_schedule", threshold=0.3,
                            steps_per_block=16, stop_at_eos=False)
    cached = _generate(policy, PROMPTS, params, "block", seeds=[1, 2, 3])
    plain = _generate(policy, PROMPTS, params, "none", seeds=[1, 2, 3])
    for a, b in zip(cached, plain, strict=True):
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.step_map, b.step_map)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_learner_recomputes_rollout_logprobs(policy):
    from rl.estimators import get_estimator
    from rl.estimators.base import EstimatorInput

    params = SamplingParams(temperature=1.2, max_tokens=64, remasking="threshold_schedule", threshold=0.1,
                            steps_per_block=8, stop_at_eos=False)
    trajs = _generate(policy, PROMPTS, params, "block", seeds=[4, 5, 6])
    inp = EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                         [t.request_id for t in trajs], [t.response_length for t in trajs],
                         [t.step_map for t in trajs], trajs[0].block_size)
    with torch.no_grad():
        est = get_estimator("trajectory")(policy, inp, temperature=params.temperature, shrink=1)
    for b, t in enumerate(trajs):
        n = t.response_length
        assert n > 0
        assert (est.token_logp[b, :n] - t.logprobs.to(est.token_logp)).abs().max() < 1e-5


def test_save_reload_keeps_names_config_and_logits(tmp_path, ckpt, policy):
    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    (src / "modeling_llada2_moe.py").write_text("# the release's own code, carried along\n")
    original = load_policy(src)
    out = save_policy(original, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llada2_moe" and config["architectures"] == ["LLaDA2MoeModelLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llada2_moe.LLaDA2MoeModelLM"
    assert (out / "modeling_llada2_moe.py").is_file()
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(src / "model.safetensors")))
    reloaded = load_policy(out)
    ids = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    bias = block_causal_bias(13, 32)
    with torch.no_grad():
        a = original.causal_lm(ids, attention_mask=bias).logits
        b = reloaded.causal_lm(ids, attention_mask=bias).logits
    assert torch.equal(a, b)
    assert reloaded.spec == original.spec


def test_released_special_ids(tmp_path):
    pol = load_policy(make_tiny_policy("llada2", tmp_path / "ling", vocab="qwen"))
    assert (pol.spec.mask_token_id, pol.spec.eos_token_id) == (156895, 156892)
    assert pol.tokenizer.decode([156895]) == "<|mask|>"


def _broken(ckpt: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(ckpt, out)
    return out


def test_bad_checkpoints_fail_with_one_line_naming_the_problem(tmp_path, ckpt):
    missing = _broken(ckpt, tmp_path, "missing")
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate.expert_bias"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing keys: model.layers.1.mlp.gate.expert_bias") as err:
        load_policy(missing)
    assert "\n" not in str(err.value)

    renamed = _broken(ckpt, tmp_path, "renamed")
    tensors = load_file(str(renamed / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors.pop("model.word_embeddings.weight")
    save_file(tensors, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="word_embeddings"):
        load_policy(renamed)

    resized = _broken(ckpt, tmp_path, "resized")
    config = json.loads((resized / "config.json").read_text())
    config["moe_intermediate_size"] += 8
    (resized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: model\.layers\.1\.mlp\.experts\.0\.gate_proj"
                                             r"\.weight has shape \[16, 32\], config\.json implies \[24, 32\]"):
        load_policy(resized)

    garbage = _broken(ckpt, tmp_path, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors: unreadable safetensors"):
        load_policy(garbage)

    for name, change, field in [("groups", {"n_group": 3}, "n_group"), ("size", {"hidden_size": None}, "hidden_size"),
                                ("tied", {"tie_word_embeddings": True}, "tie_word_embeddings"),
                                ("rope", {"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
                                ("softmax", {"score_function": "softmax"}, "score_function"),
                                ("norm_head", {"norm_head": True}, "norm_head")]:
        bad = _broken(ckpt, tmp_path, name)
        config = json.loads((bad / "config.json").read_text())
        config.update(change)
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=rf"config\.json: {field}"):
            load_policy(bad)


def test_threshold_schedule_rule_matches_llada2s_on_every_count():
    """The rule alone, against its statement, with exactly-`count` positions above the threshold included."""
    from rollout.remasking import make_remasking

    rule = make_remasking(SamplingParams(remasking="threshold_schedule", threshold=0.5))
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, count = 8, int(torch.randint(1, 5, (), generator=g))
        conf = torch.rand(1, n, generator=g)
        masked = torch.rand(1, n, generator=g) < 0.8
        masked[0, 0] = True
        conf = torch.where(masked, conf, torch.tensor(float("-inf")))
        chosen = rule.select_batch(conf, None, masked, torch.tensor([count]), [None])[0]
        idx = [i for i in range(n) if masked[0, i]]
        above = [i for i in idx if conf[0, i] > 0.5]
        want = above if len(above) >= count else sorted(idx, key=lambda i: -float(conf[0, i]))[:count]
        assert sorted(chosen.nonzero().squeeze(-1).tolist()) == sorted(want), trial


def test_training_forward_kernels_and_activation_checkpointing_agree(ckpt):
    """The learner's scoring: gradients reach routed experts and the router, are the same with HF activation
    checkpointing (what the real recipe enables), and FlexAttention's forward equals the chunked kernel."""
    pol = load_policy(ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (n,), generator=g) for n in (37, 6)]
    responses = [torch.randint(3, 90, (40,), generator=g) for _ in prompts]
    pad = pol.causal_lm.config.pad_token_id
    responses[0][:3] = pad  # clean pad tokens in the layout: as released, their embedding row gets no gradient
    noisy = [torch.where(torch.rand(40, generator=g) < 0.5, pol.spec.mask_token_id, r) for r in responses]

    def grads():
        pol.model.zero_grad()
        pol.score_responses(prompts, responses, noisy).logprobs.sum().backward()
        return {n: p.grad.clone() for n, p in pol.model.named_parameters() if p.grad is not None}

    pol.model.train()
    plain = grads()
    assert any(".mlp.experts." in n for n in plain) and any(n.endswith("mlp.gate.weight") for n in plain)
    embedding = plain["model.word_embeddings.weight"]
    assert embedding[pad].abs().max() == 0 and embedding[responses[0][5]].abs().max() > 0
    enable_checkpointing(pol.causal_lm)  # as the learner does
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    pol.model.eval()
    with torch.no_grad():
        pol.attention_kernel = "chunked"
        chunked = pol.score_responses(prompts, responses, noisy).logprobs
        pol.attention_kernel = "flex"
        flex = pol.score_responses(prompts, responses, noisy).logprobs
    assert (chunked - flex).abs().max() < 1e-5


def test_host_syncs_per_decoding_step(policy):
    """The decoders' one read per step, plus one per MoE layer (the expert group sizes; docs/FIDELITY.md)."""
    from rollout.decoding.sync_counter import count_host_syncs

    moe_layers = sum(1 for layer in policy.causal_lm.model.layers if hasattr(layer.mlp, "gate"))
    params = SamplingParams(temperature=1.0, max_tokens=64, remasking="threshold_schedule", threshold=0.3,
                            steps_per_block=16)
    with count_host_syncs() as counts:
        _generate(policy, PROMPTS, params, "block", seeds=[1, 2, 3])
    assert counts.steps > 0 and counts.syncs == counts.steps * (1 + moe_layers), counts.ops


def test_lora_with_qwen_attention_names_is_refused_at_recipe_validation():
    """The recipe's default LoRA targets are Qwen/Llama names: on LLaDA2 PEFT would match only the MLPs and leave
    attention without adapters, silently. Refused in one line before anything starts; LLaDA2's names pass."""
    from launch.recipe import RecipeError, load_recipe

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-tracerl-llada2.yaml")
    with pytest.raises(RecipeError, match=r"model\.lora\.target_modules: LLaDA2 has no q_proj, k_proj, v_proj, "
                                          r"o_proj") as err:
        load_recipe(recipe, ["model.lora.r=8"])
    assert "\n" not in str(err.value)
    ok = load_recipe(recipe, ["model.lora.r=8",
                              "model.lora.target_modules=[query_key_value,dense,gate_proj,up_proj,down_proj]"])
    assert ok.model.lora.target_modules[0] == "query_key_value"
