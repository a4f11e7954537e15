"""An independent, deliberately plain Qwen3 forward written from the architecture, not from transformers.

It reads raw safetensors by the SDAR/Qwen3 weight names, so agreement with the loaded policy proves the weight-name
mapping and the mask/position handling. Loops over heads and layers for readability, not speed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, theta):
    # x (T, D): rotate-half convention, the first half paired with the second half.
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[:, half:], x[:, :half]], -1)
    return x * cos + rotated * sin


def naive_qwen3_logits(model_dir: Path, input_ids: torch.Tensor, positions: torch.Tensor,
                       allowed: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) for one sequence; `allowed` (T, T) bool says which keys each query may see."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    w = {}
    for f in Path(model_dir).glob("*.safetensors"):
        w.update(load_file(str(f)))
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    h = w["model.embed_tokens.weight"][input_ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(-1, heads, head_dim)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(-1, kv_heads, head_dim)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(-1, kv_heads, head_dim)
        q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
        k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        outs = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            qh, kh = _rope(q[:, head], positions, theta), _rope(k[:, kv], positions, theta)
            scores = (qh @ kh.T) / math.sqrt(head_dim)
            scores = scores.masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ v[:, kv])
        h = h + torch.cat(outs, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
        h = h + (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    h = _rms_norm(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T
