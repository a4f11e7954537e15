"""LLaDA2 checkpoints on disk: load the released format onto diffrl's modelling code, save back to it, and build
tiny ones offline.

The released directories (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-*) hold `config.json` (model_type
`llada2_moe`, architectures `LLaDA2MoeModelLM`, auto_map to their own configuration/modelling files), safetensors
under the names rollout/models/families/llada2.py lists, and a fast tokenizer whose mask token `<|mask|>` is id
156895 and whose `<|endoftext|>` (eos, pad) is 156892 (the published generate's defaults). diffrl never runs their
code: the weights load onto families/llada2.py, name for name, and saving writes the original config back (with
any code files the source directory had) so the original tooling loads what diffrl saves.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rollout.models.checkpoint_files import write_config_and_code
from rollout.models.families.config_checks import check_counts, check_numbers, config_errors, tensor_names
from rollout.models.spec import ModelLoadError

# Keys of config.json that say which code reads it, not what the model is.
_CODE_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype")
AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}
EOS_ID, MASK_ID = 156892, 156895  # the released tokenizer's <|endoftext|> and <|mask|>
LING_VOCAB_SIZE = 157184
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_POSITIVE_INTS = ("intermediate_size", "num_key_value_heads", "moe_intermediate_size", "num_experts_per_tok", "n_group",
                  "topk_group", "max_position_embeddings")
_NON_NEGATIVE_INTS = ("head_dim", "num_experts", "num_shared_experts", "first_k_dense_replace")  # head_dim 0: unset
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps", "partial_rotary_factor", "routed_scaling_factor")


def llada2_config(config: dict, path: Path):
    """A config.json dict as LLaDA2MoeConfig, refused with a one-line error naming the field it cannot honour."""
    from rollout.models.families.llada2 import LLaDA2MoeConfig, check_config

    config_file = path / "config.json"
    for key in _REQUIRED:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"{config_file}: {key} must be a positive integer, got {value!r}")
    check_numbers(config, config_file, positive_ints=_POSITIVE_INTS, non_negative_ints=_NON_NEGATIVE_INTS,
                  positive_floats=_POSITIVE_FLOATS, optional=("head_dim", "num_key_value_heads", "num_experts",
                                                              "num_shared_experts"))
    if config.get("rope_scaling") is not None and not isinstance(config["rope_scaling"], dict):
        raise ModelLoadError(f"{config_file}: rope_scaling must be an object or null, got {config['rope_scaling']!r}")
    with config_errors(config_file, "LLaDA2"):
        cfg = LLaDA2MoeConfig(**{k: v for k, v in config.items() if k not in _CODE_KEYS})
        problem = check_config(cfg)
    if problem:
        raise ModelLoadError(f"{path / 'config.json'}: {problem}")
    return cfg


def check_tensors(path: Path, cfg) -> None:
    """Every tensor the config implies is in the safetensors with its shape, and nothing else is: refused with one
    line naming the tensor (and file), before transformers loads anything."""
    from safetensors import SafetensorError, safe_open

    from rollout.models.families.llada2 import LLaDA2MoeModelLM

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: LLaDA2 weights must be safetensors (no *.safetensors)")
    # No more layers / experts than the weights hold: a huge count would never finish building, even on meta.
    counts = {"num_hidden_layers": (cfg.num_hidden_layers, r"^model\.layers\.(\d+)\.")}
    if cfg.num_experts and cfg.num_hidden_layers > cfg.first_k_dense_replace:
        counts["num_experts"] = (cfg.num_experts, r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
    check_counts(tensor_names(path), path / "config.json", counts)
    with torch.device("meta"), config_errors(path / "config.json", "LLaDA2"):
        expected = {k: tuple(v.shape) for k, v in LLaDA2MoeModelLM(cfg).state_dict().items()}
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    found[name] = (tuple(f.get_slice(name).get_shape()), file)
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{file}: unreadable safetensors ({err})") from None
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelLoadError(f"{path}: LLaDA2 safetensors missing keys: {missing[0]}"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{found[unexpected[0]][1]}: unexpected tensor {unexpected[0]} for this config.json"
                             + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in expected.items():
        if found[name][0] != shape:
            raise ModelLoadError(f"{found[name][1]}: {name} has shape {list(found[name][0])}, config.json implies "
                                 f"{list(shape)}")


def load_llada2(path: Path, config: dict, dtype: torch.dtype, attn: str):
    """The released weights onto LLaDA2MoeModelLM; every missing, unexpected or mis-shaped tensor is an error."""
    from rollout.models.families.llada2 import LLaDA2MoeModelLM

    cfg = llada2_config(config, path)
    check_tensors(path, cfg)
    try:
        model, info = LLaDA2MoeModelLM.from_pretrained(str(path), config=cfg, dtype=dtype, attn_implementation=attn,
                                                       output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path}: weights failed to load ({err.__class__.__name__}: {err})") from None
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(n) for n in info.get(what) or ())
        if names:
            raise ModelLoadError(f"{path}: LLaDA2 safetensors {what.replace('_', ' ')}: {names[0]}"
                                 + (f" (+{len(names) - 1} more)" if len(names) > 1 else ""))
    return model


def tokenizer_kwargs(config: dict, path: Path) -> dict:
    """AutoTokenizer would parse config.json itself and not know `llada2_moe`: hand it the parsed config."""
    return {"config": llada2_config(config, path)}


def write_llada2_config(policy, out_dir: Path) -> None:
    """config.json back in the released format (sizes from the live model), and the source's code files."""
    config = dict(policy.source.get("config") or {})
    current = policy.causal_lm.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_experts"):
        config[key] = getattr(current, key)
    config["model_type"] = "llada2_moe"
    config["architectures"] = ["LLaDA2MoeModelLM"]
    config.setdefault("auto_map", dict(AUTO_MAP))
    write_config_and_code(config, out_dir, policy.source.get("dir"))


# ------------------------------------------------------------------------------------------------ tiny checkpoints
def ling_like_tokenizer():
    """The small character tokenizer's printable characters, then reserved filler up to the released special ids:
    `<|endoftext|>` = 156892 (eos and pad), `<|mask|>` = 156895, as the released tokenizer numbers them."""
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rollout.models.tiny import CHAT_TEMPLATE, _byte_level_alphabet

    alphabet = _byte_level_alphabet()
    chars = [alphabet[ord(c)] for c in sorted(set(string.printable) - set("\t\r\x0b\x0c"))]
    tokens = ["<|unk|>", *chars]
    tokens += [f"<|reserved_{i}|>" for i in range(len(tokens), EOS_ID)]
    specials = {EOS_ID: "<|endoftext|>", EOS_ID + 1: "<|role_start|>", EOS_ID + 2: "<|role_end|>", MASK_ID: "<|mask|>"}
    for i in range(EOS_ID, MASK_ID + 1):
        tokens.append(specials[i])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|unk|>", *specials.values())])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   mask_token="<|mask|>", unk_token="<|unk|>", chat_template=CHAT_TEMPLATE)


def make_tiny_llada2(out_dir: str | Path, *, vocab: str = "small", seed: int = 0, hidden_size: int = 32,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64,
                     num_experts: int = 8, experts_per_token: int = 2, n_group: int = 4, topk_group: int = 2,
                     moe_intermediate_size: int = 16, max_positions: int = 1024, expert_bias_scale: float = 0.1,
                     initializer_range: float = 0.25,
                     block_size: int | None = None, block_alignment: str | None = None) -> Path:
    """A random-init LLaDA2 checkpoint in the released format: one dense first layer (first_k_dense_replace 1),
    then MoE layers with a shared expert, group-limited routing and a non-zero expert bias (so routing on
    biased scores and weighing by unbiased ones are both exercised), partial rotary 0.5, qk-norm.
    initializer_range 0.25 (not the released 0.02) gives a random model peaked predictions, so confidences are not
    near-ties and decoding comparisons test the rule rather than float rounding.
    vocab "small": the character tokenizer (ids < 128); "ling": the released special ids (157184 rows).
    Only `block_size` / `block_alignment` other than LLaDA2's (32, absolute) write a diffrl.json."""
    from rollout.models.families.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
    from rollout.models.loading import save_tokenizer
    from rollout.models.tiny import small_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vocab == "ling":
        tokenizer, vocab_size = ling_like_tokenizer(), LING_VOCAB_SIZE
    elif vocab == "small":
        tokenizer = small_tokenizer("<|mask|>")
        vocab_size = (len(tokenizer) + 63) // 64 * 64
    else:
        raise ValueError(f"make_tiny_llada2: vocab must be 'small' or 'ling', got {vocab!r}")
    config = LLaDA2MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_positions, rope_theta=600000.0,
        partial_rotary_factor=0.5, num_experts=num_experts, num_shared_experts=1,
        num_experts_per_tok=experts_per_token, n_group=n_group, topk_group=topk_group,
        moe_intermediate_size=moe_intermediate_size, first_k_dense_replace=1, routed_scaling_factor=2.5,
        initializer_range=initializer_range, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    from rollout.models.families.llada2 import check_config

    problem = check_config(config)
    if problem:
        raise ValueError(f"make_tiny_llada2: {problem}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDA2MoeModelLM(config)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("expert_bias"):
                    buf.copy_(torch.randn(buf.shape) * expert_bias_scale)
            # RMSNorm weights away from 1: with unit weights a per-head qk-norm commutes with the rotary rotation
            # (so its order would not show in the logits) and swapped norm names would load unnoticed.
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    param.copy_(1.0 + 0.5 * torch.randn(param.shape))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir, qwen_family=False)
    fields = config.to_dict()
    fields.pop("original_rope_scaling", None)
    released = {k: v for k, v in fields.items() if not k.startswith("_") and k not in (
        "transformers_version", "dtype", "torch_dtype", "architectures", "model_type", "auto_map")}
    released.update(model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], auto_map=dict(AUTO_MAP),
                    rope_scaling=None, torch_dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(released, indent=2, sort_keys=True) + "\n")
    extra = {}
    if block_size is not None and block_size != 32:
        extra["block_size"] = block_size
    if block_alignment is not None and block_alignment != "absolute":
        extra["block_alignment"] = block_alignment
    if extra:
        (out_dir / "diffrl.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out_dir
