"""LLaDA2 written out from its equations, slow and plain, for tests: the forward reads the released safetensors by
their original names (so a wrong name mapping fails too), and `naive_generate` is LLaDA2's published `generate`
(block-causal recompute of the whole window every step, LLaDA2's threshold rule, stop after the block holding
EOS) with diffrl's one documented difference: temperature 0 takes the argmax.

Nothing here imports diffrl's modelling code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


class NaiveLLaDA2:
    def __init__(self, path: Path):
        path = Path(path)
        self.c = json.loads((path / "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}

    # ------------------------------------------------------------------------------------------ pieces
    def rms(self, x, weight):
        return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.c["rms_norm_eps"]))

    def swiglu(self, x, prefix):
        w = self.w
        gate = x @ w[prefix + "gate_proj.weight"].T
        up = x @ w[prefix + "up_proj.weight"].T
        return (gate * torch.sigmoid(gate) * up) @ w[prefix + "down_proj.weight"].T

    def rotate(self, x, pos):
        """Rotary on the first head_dim * partial_rotary_factor dims: pair (i, i + half) turned by pos / theta^(2i/r)."""
        r = int(x.shape[-1] * self.c["partial_rotary_factor"])
        half = r // 2
        out = x.clone()
        for i in range(half):
            angle = pos / self.c["rope_theta"] ** (2 * i / r)
            a, b = x[..., i], x[..., i + half]
            out[..., i] = a * torch.cos(angle) - b * torch.sin(angle)
            out[..., i + half] = b * torch.cos(angle) + a * torch.sin(angle)
        return out

    def route(self, x, prefix):
        """One token: [(expert, weight)] by the published rule (sigmoid, bias to choose, groups, renormalise)."""
        c = self.c
        scores = torch.sigmoid(self.w[prefix + "gate.weight"] @ x)
        biased = scores + self.w[prefix + "gate.expert_bias"]
        size = c["num_experts"] // c["n_group"]
        group_score = [sorted(biased[g * size:(g + 1) * size].tolist(), reverse=True)[:2] for g in range(c["n_group"])]
        group_score = [sum(s) for s in group_score]
        groups = sorted(range(c["n_group"]), key=lambda g: -group_score[g])[:c["topk_group"]]
        candidates = [e for e in range(c["num_experts"]) if e // size in groups]
        chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:c["num_experts_per_tok"]]
        total = sum(float(scores[e]) for e in chosen)
        k = c["num_experts_per_tok"]
        return [(e, (float(scores[e]) / (total + 1e-20) if k > 1 else float(scores[e])) * c["routed_scaling_factor"])
                for e in chosen]

    def moe(self, h, prefix):
        out = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for e, weight in self.route(h[t], prefix):
                out[t] += weight * self.swiglu(h[t:t + 1], f"{prefix}experts.{e}.")[0]
        if self.c.get("num_shared_experts"):
            out = out + self.swiglu(h, prefix + "shared_experts.")
        return out

    def attention(self, h, i, visible, pos):
        c, w = self.c, self.w
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        d = c["hidden_size"] // heads if not c.get("head_dim") else c["head_dim"]
        p = f"model.layers.{i}.attention."
        qkv = (h @ w[p + "query_key_value.weight"].T).view(h.shape[0], heads + 2 * kv_heads, d)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        if c.get("use_qk_norm", True):
            q, k = self.rms(q, w[p + "query_layernorm.weight"]), self.rms(k, w[p + "key_layernorm.weight"])
        q, k = self.rotate(q, pos[:, None]), self.rotate(k, pos[:, None])
        out = torch.zeros(h.shape[0], heads, d, dtype=h.dtype)
        for head in range(heads):
            kh = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, kh].T / d ** 0.5
            scores = scores.masked_fill(~visible, float("-inf"))
            out[:, head] = torch.softmax(scores, dim=-1) @ v[:, kh]
        return out.reshape(h.shape[0], -1) @ w[p + "dense.weight"].T

    def logits(self, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(T,) ids, (T, T) bool visibility, positions 0..T-1 -> (T, V) float64 logits."""
        w, c = self.w, self.c
        pos = torch.arange(ids.numel(), dtype=torch.float64)
        h = w["model.word_embeddings.weight"][ids]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = h + self.attention(self.rms(h, w[p + "input_layernorm.weight"]), i, visible, pos)
            x = self.rms(h, w[p + "post_attention_layernorm.weight"])
            h = h + (self.swiglu(x, p + "mlp.") if i < c["first_k_dense_replace"] else self.moe(x, p + "mlp."))
        return self.rms(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def block_visibility(length: int, block: int) -> torch.Tensor:
    """LLaDA2 generate's mask: query in block a sees key in block b iff b <= a."""
    ids = torch.arange(length) // block
    return ids[None, :] <= ids[:, None]


def naive_generate(model: NaiveLLaDA2, prompt: list[int], *, gen_length: int, block: int, steps: int,
                   threshold: float, mask_id: int, eos_id: int, temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> list[int]:
    """LLaDA2's published generate for one prompt. Sampling (temperature > 0) draws one uniform per masked position
    of the block per step, in position order, and takes the first token whose cumulative probability exceeds
    it (the same draws diffrl's sampler makes); temperature 0 takes the argmax."""
    p = len(prompt)
    num_blocks = (p + gen_length + block - 1) // block
    x = [mask_id] * (num_blocks * block)
    x[:p] = prompt
    base, extra = divmod(block, steps)
    schedule = [base + (1 if s < extra else 0) for s in range(steps)]
    for b in range(p // block, num_blocks):
        end = (b + 1) * block
        for step in range(steps):
            masked = [i for i in range(end - block, end) if x[i] == mask_id]
            if not masked:
                break
            logits = model.logits(torch.tensor(x[:end]), block_visibility(end, block))
            proposals = {}
            uniforms = torch.rand(len(masked), 1, generator=generator) if temperature > 0 else None
            for n, i in enumerate(masked):
                if temperature > 0:
                    probs = torch.softmax(logits[i] / temperature, dim=-1)
                    cdf = torch.cumsum(probs, dim=-1)
                    token = int((cdf > float(uniforms[n]) * cdf[-1]).nonzero()[0])
                else:
                    probs = torch.softmax(logits[i], dim=-1)
                    token = int(probs.argmax())
                proposals[i] = (token, float(probs[token]))
            above = [i for i in masked if proposals[i][1] > threshold]
            if len(above) >= schedule[step]:
                chosen = above
            else:
                chosen = sorted(masked, key=lambda i: -proposals[i][1])[:min(schedule[step], len(masked))]
            for i in chosen:
                x[i] = proposals[i][0]
        if eos_id in x[p:end]:
            break
    out = x[p:p + gen_length]
    return out[:out.index(eos_id) + 1] if eos_id in out else out
