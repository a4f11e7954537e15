"""SDAR-MoE (SDAR-30B-A3B-Chat/-Sci, `SDARMoeForCausalLM`, `model_type: sdar_moe`) on transformers' native
`Qwen3MoeForCausalLM`, without the checkpoint's own code.

SDAR-MoE is Qwen3-30B-A3B trained with SDAR's block-diffusion objective: the architecture and the weight names are
Qwen3-MoE's (read from JetEngine's `sdar_moe.py` and SGLang's `sdar_moe.py`, docs/FIDELITY.md section sdar-moe):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{l}.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.{l}.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight
    MoE layer:   model.layers.{l}.mlp.gate.weight                       (E, H)   the router
                 model.layers.{l}.mlp.experts.{e}.{gate,up}_proj.weight  (I_moe, H)
                 model.layers.{l}.mlp.experts.{e}.down_proj.weight       (H, I_moe)
    dense layer: model.layers.{l}.mlp.{gate,up}_proj.weight (I, H), mlp.down_proj.weight (H, I)

A layer is MoE iff l not in mlp_only_layers and num_experts > 0 and (l + 1) % decoder_sparse_step == 0.
transformers 5 stores each MoE layer's experts fused: `mlp.experts.gate_up_proj` (E, 2 I_moe, H) = [gate; up] per
expert and `mlp.experts.down_proj` (E, H, I_moe). `to_native` / `to_original` are that mapping and its inverse,
checked name by name and shape by shape (every tensor mapped, none missing, none left over), so a checkpoint that
does not fit fails with one line naming the file and tensor instead of loading half-initialised.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from rollout.models.checkpoint_files import write_config_and_code
from rollout.models.families.config_checks import check_counts, check_numbers, config_errors, tensor_names
from rollout.models.spec import ModelLoadError

MODEL_TYPE = "sdar_moe"
ARCHITECTURE = "SDARMoeForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
    "AutoModel": "modeling_sdar_moe.SDARMoeModel",
    "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM",
}
# Fields whose transformers default differs from, or cannot stand in for, the checkpoint's own: required in
# config.json (Qwen3MoeConfig defaults norm_topk_prob to False, Qwen3-30B-A3B and SDAR-30B-A3B set it to true).
REQUIRED_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
_POSITIVE_INTS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size", "hidden_size",
                  "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "decoder_sparse_step", "max_position_embeddings")
_NOT_QWEN3_MOE = ("auto_map", "architectures", "model_type")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def is_sdar_moe(config: dict) -> bool:
    return str(config.get("model_type", "")).lower() == MODEL_TYPE


# --------------------------------------------------------------------------------------------------- config
def qwen3_moe_config(config: dict, config_file: Path):
    """The SDAR-MoE config.json as a transformers Qwen3MoeConfig (missing MoE fields: one-line error)."""
    import transformers

    for name in REQUIRED_FIELDS:
        if config.get(name) is None:
            raise ModelLoadError(f"{config_file}: {name} missing (an SDAR-MoE config names its MoE layout)")
    check_numbers(config, config_file, positive_ints=_POSITIVE_INTS, positive_floats=("rope_theta", "rms_norm_eps"),
                  optional=("head_dim",))
    if config["num_experts_per_tok"] > config["num_experts"]:
        raise ModelLoadError(f"{config_file}: num_experts_per_tok {config['num_experts_per_tok']} > num_experts "
                             f"{config['num_experts']}")
    if not isinstance(config["norm_topk_prob"], bool):
        raise ModelLoadError(f"{config_file}: norm_topk_prob must be true or false, got {config['norm_topk_prob']!r}")
    fields = {k: v for k, v in config.items() if k not in _NOT_QWEN3_MOE}
    with config_errors(config_file, "Qwen3-MoE (SDAR-MoE)"):
        return transformers.Qwen3MoeConfig(**fields)


def moe_layers(cfg) -> list[int]:
    """Indices of the MoE layers (the rest have a dense MLP), by Qwen3-MoE's rule."""
    only = set(cfg.mlp_only_layers or [])
    return [layer for layer in range(cfg.num_hidden_layers)
            if layer not in only and cfg.num_experts > 0 and (layer + 1) % cfg.decoder_sparse_step == 0]


# -------------------------------------------------------------------------------------------- weight names
def to_native(original: dict[str, torch.Tensor], cfg, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """SDAR-MoE tensors (per-expert names) -> Qwen3MoeForCausalLM's state dict (fused experts); empties `original`.

    Every per-expert tensor must be present exactly once with its shape; anything else passes through by name and
    is checked against the model by `check_state`."""
    hidden, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    moe = set(moe_layers(cfg))
    native, parts = {}, {}
    # Consumes `original` (and each layer's per-expert tensors once fused), so a 30B checkpoint is not held twice.
    for name in list(original):
        tensor = original.pop(name)
        match = _EXPERT.match(name)
        if match is None:
            native[name] = tensor
            continue
        layer, expert, proj = int(match[1]), int(match[2]), match[3]
        if layer not in moe:
            raise ModelLoadError(f"{where}: {name}: layer {layer} is not an MoE layer (decoder_sparse_step "
                                 f"{cfg.decoder_sparse_step}, mlp_only_layers {list(cfg.mlp_only_layers or [])})")
        if expert >= experts:
            raise ModelLoadError(f"{where}: {name}: expert {expert} >= num_experts {experts}")
        if tuple(tensor.shape) != shapes[proj]:
            raise ModelLoadError(f"{where}: {name}: shape {tuple(tensor.shape)}, expected {shapes[proj]} "
                                 f"(hidden_size {hidden}, moe_intermediate_size {inter})")
        parts[(layer, expert, proj)] = tensor
    for layer in sorted(moe):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for expert in range(experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if (layer, expert, proj) not in parts:
                    raise ModelLoadError(f"{where}: {prefix}.{expert}.{proj}.weight missing")
            gate_up.append(torch.cat([parts[(layer, expert, "gate_proj")], parts[(layer, expert, "up_proj")]], 0))
            down.append(parts[(layer, expert, "down_proj")])
        native[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        native[f"{prefix}.down_proj"] = torch.stack(down)
        del gate_up, down
        for key in [k for k in parts if k[0] == layer]:
            del parts[key]
    return native


def to_original(native: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The inverse of `to_native`: fused expert tensors split back into SDAR-MoE's per-expert names."""
    inter = cfg.moe_intermediate_size
    original = {}
    for name, tensor in native.items():
        match = _FUSED.match(name)
        if match is None:
            original[name] = tensor
            continue
        prefix = f"model.layers.{match[1]}.mlp.experts"
        for expert in range(tensor.shape[0]):
            if match[2] == "gate_up_proj":
                original[f"{prefix}.{expert}.gate_proj.weight"] = tensor[expert, :inter].contiguous()
                original[f"{prefix}.{expert}.up_proj.weight"] = tensor[expert, inter:].contiguous()
            else:
                original[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert].contiguous()
    return original


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple], where: str) -> None:
    """One line naming the first missing, unexpected or misshapen tensor."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{where}: {missing[0]} missing ({len(missing)} tensor(s) missing)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ModelLoadError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} not in a Qwen3-MoE model)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ModelLoadError(f"{where}: {name}: shape {tuple(state[name].shape)}, expected {tuple(shape)}")


# ----------------------------------------------------------------------------------------------- load/save
def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (the index's, when there is one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{index}: malformed index ({err.__class__.__name__}: {err})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights (SDAR-MoE checkpoints are safetensors)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(str(path / name))
        except (OSError, SafetensorError) as err:
            raise ModelLoadError(f"{path / name}: unreadable safetensors ({err.__class__.__name__}: {err})") from None
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ModelLoadError(f"{path / name}: {twice[0]} also in another weights file")
        tensors.update(part)
    return tensors


def build_model(path: Path, config: dict, dtype: torch.dtype, attn: str):
    """Qwen3MoeForCausalLM with the checkpoint's weights, mapped and checked (no trust_remote_code)."""
    import transformers

    config_file = path / "config.json"
    cfg = qwen3_moe_config(config, config_file)
    cfg._attn_implementation = attn
    # The config may not ask for more layers / experts than the weights hold (a huge count would never finish
    # building, even on the meta device).
    counts = {"num_hidden_layers": (cfg.num_hidden_layers, r"^model\.layers\.(\d+)\.")}
    with config_errors(config_file, "Qwen3-MoE (SDAR-MoE)"):
        if moe_layers(cfg):
            counts["num_experts"] = (cfg.num_experts, r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
    check_counts(tensor_names(path), config_file, counts)
    with torch.device("meta"), config_errors(config_file, "Qwen3-MoE (SDAR-MoE)"):  # no random init
        model = transformers.Qwen3MoeForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = to_native(read_weights(path), cfg, where=str(path))
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
        if state["lm_head.weight"] is None:
            raise ModelLoadError(f"{path}: model.embed_tokens.weight missing")
    check_state(state, expected, str(path))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary frequencies) are not in the checkpoint: build them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{path}: {left[0]} was never loaded")
    return model


def save_weights(state: dict[str, torch.Tensor], cfg, out_dir: Path, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write the native state dict under SDAR-MoE's names (safetensors, sharded with an index past one shard)."""
    from safetensors.torch import save_file

    original = to_original(state, cfg)
    if cfg.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    shards, sizes = [[]], [0]
    for name in sorted(original):
        nbytes = original[name].numel() * original[name].element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    for stale in list(out_dir.glob("*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(original, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: original[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(source_config: dict, model_cfg, block_size: int, source_dir: str | None, out_dir: Path) -> None:
    """config.json as SDAR-MoE has it (model_type, architectures, auto_map, block size), code files copied."""
    config = dict(source_config)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size",
                "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
        value = getattr(model_cfg, key)  # attributes: to_dict() names num_experts `num_local_experts`
        config[key] = list(value) if key == "mlp_only_layers" else value
    config["model_type"] = MODEL_TYPE
    config["block_size"] = block_size
    config.setdefault("architectures", [ARCHITECTURE])
    config.setdefault("auto_map", dict(AUTO_MAP))
    write_config_and_code(config, out_dir, source_dir, also=("generation_config.json",))


# ------------------------------------------------------------------------------------------------- tiny
def write_tiny(out_dir: Path, qwen3_fields: dict, moe: dict, mask_token_id: int, block_size: int, seed: int,
               router_std: float = 1.0) -> None:
    """A random-init SDAR-MoE checkpoint in the original format (config.json + per-expert safetensors names).

    The router is drawn with `router_std` and the experts with fan-in scaled weights (std 1/sqrt(fan_in)):
    transformers' 0.02 makes every tiny token's routing a near tie and the experts' output ~1e-3 of the residual,
    so top-k choices, norm_topk_prob and the expert weights would hardly show in the logits tests compare."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(**qwen3_fields, **moe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3MoeForCausalLM(cfg)
        with torch.no_grad():
            for layer in moe_layers(cfg):
                mlp = model.model.layers[layer].mlp
                mlp.gate.weight.normal_(0.0, router_std)
                mlp.experts.gate_up_proj.normal_(0.0, cfg.hidden_size ** -0.5)
                mlp.experts.down_proj.normal_(0.0, cfg.moe_intermediate_size ** -0.5)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_weights(state, cfg, out_dir)
    config = {**qwen3_fields, **moe, "rope_theta": cfg.rope_parameters["rope_theta"], "rms_norm_eps": cfg.rms_norm_eps,
              "hidden_act": cfg.hidden_act, "attention_bias": False, "use_sliding_window": False,
              "decoder_sparse_step": cfg.decoder_sparse_step, "mlp_only_layers": list(cfg.mlp_only_layers),
              "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False,
              "mask_token_id": mask_token_id, "torch_dtype": "float32"}
    config.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=dict(AUTO_MAP), block_size=block_size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
