"""Load and save diffusion policies from local checkpoint directories (never from a hub).

Formats:
- diffrl / plain HF (Qwen2, Qwen3, Llama causal LMs): transformers' own classes, plus `diffrl.json` beside
  config.json recording the diffusion spec (kind, mask id, block size).
- SDAR / TraDo (`model_type: sdar`): the weights are Qwen3's, name for name, so they load onto
  `Qwen3ForCausalLM` without `trust_remote_code`. Saving writes `model_type: sdar` and the original config back,
  with any code files (`*.py`) the source directory had, so the original tooling loads what we save.
- SDAR-MoE (`model_type: sdar_moe`, SDAR-30B-A3B): Qwen3-MoE weights with per-expert names, mapped onto
  `Qwen3MoeForCausalLM` and back by rollout/models/families/sdar_moe.py; kind `sdar` (SDAR's decoding).
- LLaDA2 (`model_type: llada2_moe`): the released weights, name for name, on diffrl's own modelling code
  (rollout/models/families/llada2.py; the checkpoint's code is never run); saved back in the released format.
- LLaDA / Dream with their own modelling code: loaded through `trust_remote_code` from the local directory, only
  when the recipe allows it (`model.trust_remote_code: true`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rollout.models.checkpoint_files import write_config_and_code
from rollout.models.families import sdar_moe
from rollout.models.policy import DiffusionPolicy
from rollout.models.spec import KINDS, DiffusionSpec, ModelLoadError, default_spec_fields

SIDECAR = "diffrl.json"
MASK_TOKEN_NAMES = ("<|MASK|>", "<|mask|>", "<mask>", "[MASK]", "<|mdm_mask|>")
_MODEL_TYPE_KIND = {"sdar": "sdar", "sdar_moe": "sdar", "llada": "llada", "dream": "dream", "llada2_moe": "llada2",
                    "diffusion_gemma": "diffusion_gemma"}
_BLOCK_MODEL_TYPES = ("qwen2", "qwen3", "llama")
# Checkpoints whose own tokenizer is Qwen2Tokenizer: TraDo/SDAR, Dream, and Qwen2/Qwen3 run as block models.
QWEN_FAMILY_KINDS = ("sdar", "dream")
QWEN_MODEL_TYPES = ("qwen2", "qwen3", "sdar", "sdar_moe", "dream")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: malformed JSON ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def detect_kind(config: dict, sidecar: dict, requested: str | None, path: Path) -> str:
    if requested and requested != "auto":
        if requested not in KINDS:
            raise ModelLoadError(f"model.kind: unknown kind {requested!r} (expected one of {', '.join(KINDS)})")
        return requested
    if "kind" in sidecar:
        return sidecar["kind"]
    model_type = str(config.get("model_type", "")).lower()
    if model_type in _MODEL_TYPE_KIND:
        return _MODEL_TYPE_KIND[model_type]
    if model_type in _BLOCK_MODEL_TYPES:
        return "block"
    raise ModelLoadError(
        f"{path / 'config.json'}: model_type {model_type!r} is not a known diffusion LM; set model.kind"
    )


def find_mask_token_id(tokenizer, config: dict, sidecar: dict, path: Path) -> int:
    for source in (sidecar, config):
        if source.get("mask_token_id") is not None:
            return int(source["mask_token_id"])
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    vocab = tokenizer.get_vocab()
    for name in MASK_TOKEN_NAMES:
        if name in vocab:
            return int(vocab[name])
    raise ModelLoadError(f"{path}: tokenizer has no mask token (looked for {', '.join(MASK_TOKEN_NAMES)})")


def _check_weights(path: Path) -> None:
    if not (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))):
        raise ModelLoadError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")


def tokenizer_config(path: Path) -> dict:
    """For an SDAR/TraDo checkpoint, the config AutoTokenizer would otherwise read from config.json: a plain
    Qwen3Config (its model_type `sdar` is unknown to transformers, which warns "a model of type sdar to instantiate
    a model of type ..." when it parses the file itself); for LLaDA2 (`llada2_moe`, also unknown, with an auto_map
    that would ask to run the checkpoint's code) diffrl's own config. Other checkpoints: nothing."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return {}
    config = read_json(config_file, "config.json")
    if sdar_moe.is_sdar_moe(config):
        return {"config": sdar_moe.qwen3_moe_config(config, config_file)}
    if config.get("model_type") == "llada2_moe":
        from rollout.models.families.llada2_checkpoint import tokenizer_kwargs

        return tokenizer_kwargs(config, path)
    if config.get("model_type") != "sdar":
        return {}
    import transformers

    return {"config": transformers.Qwen3Config(**_qwen3_fields(config))}


def _qwen3_fields(config: dict) -> dict:
    """An SDAR/TraDo config.json as Qwen3Config fields (the weights are Qwen3's, name for name)."""
    return {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")}


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                             **tokenizer_config(path))
    except ModelLoadError:  # the config the tokenizer is handed was refused (names config.json and the field)
        raise
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: tokenizer failed to load ({err.__class__.__name__}: {err})") from None


# Attention kernels that honour diffrl's additive float 4D masks (rollout/models/masks.py). flash_attention_2 takes
# padding masks only: block-diffusion attention under it would be silently wrong, so it is refused.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def _build_model(path: Path, kind: str, config: dict, dtype: torch.dtype, trust_remote_code: bool,
                 attn_implementation: str | None = None):
    import transformers

    if attn_implementation is not None and attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ModelLoadError(f"model.attn_implementation: {attn_implementation!r} cannot take diffrl's additive 4D "
                             f"attention masks (one of {', '.join(ATTENTION_IMPLEMENTATIONS)})")
    attn = attn_implementation or "sdpa"
    has_own_code = "auto_map" in config and kind in ("llada", "dream")
    if kind == "llada2":  # diffrl's own modelling code, never the checkpoint's (families/llada2.py)
        from rollout.models.families.llada2_checkpoint import load_llada2

        return load_llada2(path, config, dtype, attn), False
    try:
        if sdar_moe.is_sdar_moe(config):
            return sdar_moe.build_model(path, config, dtype, attn), False
        if kind == "sdar":
            qwen3_config = transformers.Qwen3Config(**_qwen3_fields(config))
            qwen3_config._attn_implementation = attn
            return transformers.Qwen3ForCausalLM.from_pretrained(str(path), config=qwen3_config, dtype=dtype), False
        if has_own_code:
            if not trust_remote_code:
                raise ModelLoadError(
                    f"{path / 'config.json'}: the model ships its own code (auto_map); "
                    "set model.trust_remote_code=true to run it"
                )
            auto = transformers.AutoModelForCausalLM if "AutoModelForCausalLM" in config["auto_map"] \
                else transformers.AutoModel
            own = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
            return auto.from_pretrained(str(path), dtype=dtype, trust_remote_code=True, **own), True
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn
        ), False
    except (OSError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"{path}: weights failed to load ({err.__class__.__name__}: {err})") from None


def load_policy(
    path: str | Path,
    *,
    kind: str | None = None,
    block_size: int | None = None,
    block_alignment: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    attention_kernel: str = "auto",
) -> DiffusionPolicy:
    """Load a policy from a local directory; every failure is a one-line ModelLoadError naming the file.

    `block_size` / `block_alignment` override the checkpoint's (diffrl.json), else the kind's defaults: SDAR/TraDo
    checkpoints count blocks from the sequence start (`absolute`), diffrl's generic block models from the response.
    `attn_implementation`: one of ATTENTION_IMPLEMENTATIONS (None: sdpa; a model with its own code: its default).
    `attention_kernel`: how masks described per position are run (rollout/models/attention.py KERNELS).
    """
    from rollout.models.attention import check_kernel

    check_kernel(attention_kernel)
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: checkpoint directory not found")
    config = read_json(path / "config.json", "config.json")
    sidecar = read_json(path / SIDECAR, SIDECAR) if (path / SIDECAR).exists() else {}
    _check_weights(path)
    kind = detect_kind(config, sidecar, kind, path)
    if kind == "diffusion_gemma":  # encoder-decoder, no mask token: its own policy (rollout/models/families/)
        from rollout.models.families.diffusion_gemma import load_diffusion_gemma

        return load_diffusion_gemma(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                    block_size=block_size)
    tokenizer = _load_tokenizer(path, trust_remote_code)
    fields = default_spec_fields(kind)
    if kind == "sdar" and config.get("block_size") is not None:  # SDAR/TraDo configs carry their block size
        fields["block_size"] = int(config["block_size"])
    family = ("attention", "logits_shift", "block_size", "step_schedule", "confidence_source", "block_alignment")
    fields.update({k: sidecar[k] for k in family if k in sidecar})
    if block_size is not None:
        fields["block_size"] = block_size
    if block_alignment is not None:
        fields["block_alignment"] = block_alignment
    eos = sidecar.get("eos_token_id", tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                      else config.get("eos_token_id"))
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise ModelLoadError(f"{path}: neither the tokenizer nor config.json names an eos token")
    pad = sidecar.get("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    spec = DiffusionSpec(
        kind=kind, mask_token_id=find_mask_token_id(tokenizer, config, sidecar, path),
        pad_token_id=int(pad), eos_token_id=int(eos), **fields,
    )
    vocab_size = int(config.get("vocab_size", 0))
    if vocab_size and spec.mask_token_id >= vocab_size:
        raise ModelLoadError(f"{path / 'config.json'}: mask token id {spec.mask_token_id} >= vocab_size {vocab_size}")
    model, remote = _build_model(path, kind, config, dtype, trust_remote_code, attn_implementation)
    model.to(device)
    model.eval()
    source = {"format": sdar_moe.MODEL_TYPE if sdar_moe.is_sdar_moe(config) else kind, "config": config, "dir": str(path), "remote_code": remote}
    return DiffusionPolicy(model, tokenizer, spec, source, attention_kernel=attention_kernel)


def save_policy(policy: DiffusionPolicy, out_dir: str | Path) -> Path:
    """Write an HF directory (safetensors, config, tokenizer, diffrl.json); LoRA adapters are merged in.

    SDAR-format policies are written back as SDAR (model_type, auto_map and code files preserved).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = policy.causal_lm
    peft = policy.model if hasattr(policy.model, "merge_adapter") else None
    base = {}
    if peft is not None:
        base = {n: p.detach().clone() for n, p in lm.named_parameters() if ".base_layer." in n}
        peft.merge_adapter()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in lm.state_dict().items() if "lora_" not in k}
        state = {_strip_peft_prefix(k): v for k, v in state.items()}
        if policy.source.get("format") == sdar_moe.MODEL_TYPE:  # per-expert names, as SDAR-MoE ships them
            sdar_moe.save_weights(state, lm.config, out_dir)
        else:
            lm.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    finally:
        if peft is not None:
            peft.unmerge_adapter()
            # unmerge subtracts the delta again, which is not exact in floating point: restore the base bit for bit
            with torch.no_grad():
                for n, p in lm.named_parameters():
                    if n in base:
                        p.copy_(base[n])
    model_type = str((policy.source.get("config") or {}).get("model_type", "")).lower()
    qwen = policy.spec.kind in QWEN_FAMILY_KINDS or model_type in QWEN_MODEL_TYPES
    save_tokenizer(policy.tokenizer, out_dir, qwen_family=qwen)
    if policy.source.get("format") == "sdar":
        _write_sdar_config(policy, out_dir)
    elif policy.source.get("format") == sdar_moe.MODEL_TYPE:
        sdar_moe.write_config(policy.source.get("config") or {}, lm.config, policy.spec.block_size,
                              policy.source.get("dir"), out_dir)
    elif policy.source.get("format") == "llada2":
        from rollout.models.families.llada2_checkpoint import write_llada2_config

        write_llada2_config(policy, out_dir)
    sidecar = policy.spec.to_dict()
    (out_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out_dir


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _is_byte_level_bpe(tokenizer_json: dict) -> bool:
    """Qwen2Tokenizer rebuilds a byte-level BPE from vocab and merges; only such a tokenizer may be named so."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (tokenizer_json.get("model") or {}).get("type") == "BPE" and any(
        p.get("type") == "ByteLevel" for p in parts)


def save_tokenizer(tokenizer, out_dir: str | Path, qwen_family: bool) -> None:
    """save_pretrained, then the layout transformers 4.x loaders read as well as 5.x.

    transformers 5 writes `tokenizer_class: TokenizersBackend` (a class 4.x does not have), no
    special_tokens_map.json, no `added_tokens_decoder` and the chat template only in chat_template.jinja. The
    original SDAR/TraDo tooling runs on 4.x, so: the class becomes `Qwen2Tokenizer` for a Qwen-family byte-level
    BPE (what real Qwen/SDAR/TraDo checkpoints name), else `PreTrainedTokenizerFast`; every added token (the mask
    token `<|MASK|>` included) is listed in `added_tokens_decoder`; the special tokens are written to both files.
    """
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer_config.json")
    tokenizer_json = read_json(out_dir / "tokenizer.json", "tokenizer.json")
    config.pop("backend", None)
    byte_bpe = _is_byte_level_bpe(tokenizer_json)
    if qwen_family and byte_bpe:
        config["tokenizer_class"] = "Qwen2Tokenizer"
    elif config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["added_tokens_decoder"] = {
        str(token["id"]): {key: token[key] for key in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                         "special")}
        for token in sorted(tokenizer_json.get("added_tokens", []), key=lambda t: t["id"])
    }
    specials = {name: str(getattr(tokenizer, name)) for name in SPECIAL_TOKEN_NAMES
                if getattr(tokenizer, name, None) is not None}
    config.update(specials)
    if byte_bpe:
        config.setdefault("add_prefix_space", False)
        config.setdefault("errors", "replace")
    template = out_dir / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text()
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {name: {"content": value, **plain} for name, value in specials.items()}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")


def _strip_peft_prefix(name: str) -> str:
    # PEFT renames wrapped linears' weights to `<name>.base_layer.weight`; the saved checkpoint uses plain names.
    return name.replace(".base_layer.", ".")


def _write_sdar_config(policy: DiffusionPolicy, out_dir: Path) -> None:
    config = dict(policy.source.get("config") or {})
    current = policy.causal_lm.config.to_dict()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        config[key] = current[key]
    config["model_type"] = "sdar"
    config["block_size"] = policy.spec.block_size  # SDAR configs record the block the weights decode with
    config.setdefault("architectures", ["SDARForCausalLM"])
    write_config_and_code(config, out_dir, policy.source.get("dir"))
