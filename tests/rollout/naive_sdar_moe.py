"""An independent, deliberately plain SDAR-MoE forward written from the equations, not from transformers.

It reads the raw safetensors by SDAR-MoE's own names (per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`,
router `mlp.gate.weight`), so agreement with the loaded policy proves the weight-name mapping, the routing rule and
the mask/position handling. Per token, per head, per layer, per expert loops: slow and obvious.

    attention: pre-norm, q/k RMS-normed per head, rotary (rotate-half), GQA, additive visibility from `allowed`
    MoE MLP:   p = softmax(x W_router^T); S = the top-k experts by p; w_e = p_e (norm_topk_prob: p_e / sum_S p)
               y = sum_{e in S} w_e * W_down,e (silu(W_gate,e x) * (W_up,e x))
    dense MLP: y = W_down (silu(W_gate x) * (W_up x)) on layers in mlp_only_layers or off the sparse step
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
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    half = dim // 2
    return x * cos + torch.cat([-x[:, half:], x[:, :half]], -1) * sin


def _swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(gate @ x) * (up @ x)) @ down.T


def _moe_token(x, w, prefix, cfg):
    """One token's MoE output, and the experts it went to."""
    probs = torch.softmax(w[prefix + "gate.weight"] @ x, dim=-1)
    order = sorted(range(probs.numel()), key=lambda e: -float(probs[e]))
    chosen = order[:cfg["num_experts_per_tok"]]
    total = sum(probs[e] for e in chosen)
    out = torch.zeros_like(x)
    for e in chosen:
        weight = probs[e] / total if cfg["norm_topk_prob"] else probs[e]
        ex = f"{prefix}experts.{e}."
        out = out + weight * _swiglu(x, w[ex + "gate_proj.weight"], w[ex + "up_proj.weight"],
                                     w[ex + "down_proj.weight"])
    return out, chosen


def is_moe_layer(layer: int, cfg: dict) -> bool:
    return (layer not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0
            and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0)


def naive_sdar_moe_logits(model_dir: Path, input_ids: torch.Tensor, positions: torch.Tensor,
                          allowed: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """(logits (T, V), routes[layer][token] = chosen experts (empty on dense layers)) for one sequence."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    w = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        w.update(load_file(str(f)))
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    h = w["model.embed_tokens.weight"][input_ids]
    routes = []
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
            scores = ((qh @ kh.T) / math.sqrt(head_dim)).masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ v[:, kv])
        h = h + torch.cat(outs, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        if is_moe_layer(layer, cfg):
            rows, chosen = zip(*(_moe_token(x[t], w, p + "mlp.", cfg) for t in range(x.shape[0])))
            h = h + torch.stack(rows)
            routes.append(list(chosen))
        else:
            h = h + torch.stack([_swiglu(x[t], w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"],
                                         w[p + "mlp.down_proj.weight"]) for t in range(x.shape[0])])
            routes.append([[] for _ in range(x.shape[0])])
    h = _rms_norm(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T, routes
