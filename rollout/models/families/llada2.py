"""LLaDA2.0 / LLaDA2.1 (inclusionAI, `LLaDA2MoeModelLM`, model_type `llada2_moe`): diffrl's own modelling code.

transformers has no class for these weights (its `bailing_*` models are the hybrid linear-attention Ring models),
so this module implements the architecture from its equations, with the released checkpoints' parameter names,
so that `from_pretrained` reads and `save_pretrained` writes the original safetensors unchanged:

    model.word_embeddings                         token embeddings (no scaling)
    model.layers.i.input_layernorm                RMSNorm (weight * x / rms(x), computed in fp32)
    model.layers.i.attention.query_key_value      one projection to [H query | Hkv key | Hkv value] heads
    model.layers.i.attention.query_layernorm      RMSNorm over each head's dim (use_qk_norm), before rotary
    model.layers.i.attention.key_layernorm
    model.layers.i.attention.dense                output projection
    model.layers.i.post_attention_layernorm
    model.layers.i.mlp                            SwiGLU (gate_proj/up_proj/down_proj) for i < first_k_dense_replace,
                                                  else the MoE block:
    model.layers.i.mlp.gate.weight                router (E, hidden), run in fp32
    model.layers.i.mlp.gate.expert_bias           per-expert routing bias (a buffer: used to choose, not to weigh)
    model.layers.i.mlp.experts.e.*                routed SwiGLU experts (moe_intermediate_size)
    model.layers.i.mlp.shared_experts.*           one SwiGLU of moe_intermediate_size * num_shared_experts
    model.norm, lm_head                           final RMSNorm, untied vocabulary projection

Routing (per token): s = sigmoid(W_g x) in fp32; experts are chosen on s + expert_bias, group-limited (experts in
n_group equal groups, a group scored by the sum of its two best biased scores, the topk_group best groups kept,
then the top-k experts among them); the chosen experts are weighed by their *unbiased* s, renormalised over the
k chosen (when k > 1) and multiplied by routed_scaling_factor. Rotary embeddings rotate the first
head_dim * partial_rotary_factor dims of each head (rotate-half convention), the rest pass through.

Attention goes through transformers' attention registry under `config._attn_implementation`, which diffrl's
dispatcher (rollout/models/attention.py) wraps: the block-causal mask arrives either as a dense additive 4D mask
or as a per-position description run by the linear-memory kernels. LLaDA2 has no causal default: a forward without
a mask is refused rather than silently run with some other layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

MODEL_TYPE = "llada2_moe"
ARCHITECTURE = "LLaDA2MoeModelLM"


class LLaDA2MoeConfig(PretrainedConfig):
    """The released config.json's fields (defaults: LLaDA2.0-mini's shape where known, else the published code's)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=None, hidden_act="silu",
                 use_qkv_bias=False, use_qk_norm=True, use_bias=False, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 initializer_range=0.02, max_position_embeddings=32768, rope_theta=600000.0, rope_scaling=None,
                 partial_rotary_factor=0.5, num_experts=256, num_shared_experts=1, num_experts_per_tok=8, n_group=8,
                 topk_group=4, routed_scaling_factor=2.5, moe_intermediate_size=512, first_k_dense_replace=1,
                 attention_dropout=0.0, pad_token_id=156892, eos_token_id=156892, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.original_rope_scaling = rope_scaling  # (transformers 5 reinterprets a `rope_scaling` attribute)
        self.partial_rotary_factor = partial_rotary_factor
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.attention_dropout = attention_dropout
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def check_config(config: LLaDA2MoeConfig) -> str | None:
    """The first field this implementation cannot honour, as a one-line message (None: all fine)."""
    if config.tie_word_embeddings:
        return "tie_word_embeddings: LLaDA2 checkpoints have an untied lm_head; tied weights are not supported"
    scaling = config.original_rope_scaling
    if scaling not in (None, {}) and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        return f"rope_scaling: {scaling!r} is not supported (plain rotary only)"
    if config.num_attention_heads % config.num_key_value_heads:
        return (f"num_attention_heads: {config.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{config.num_key_value_heads}")
    rope_dim = int(config.head_dim * config.partial_rotary_factor)
    if rope_dim < 2 or rope_dim % 2:
        return f"partial_rotary_factor: head_dim {config.head_dim} x {config.partial_rotary_factor} must be an even dim >= 2"
    # Fields where the released modelling code and SGLang's read the weights differently (or the former ignores
    # them): only the values on which they agree are accepted.
    disagreements = (
        ("score_function", lambda v: v in (None, "sigmoid"), "only sigmoid routing"),
        ("moe_router_enable_expert_bias", lambda v: v in (None, True), "routing always has an expert bias"),
        ("norm_topk_prob", lambda v: v in (None, True), "chosen experts' weights are always renormalised"),
        ("norm_head", lambda v: not v, "lm_head is used as stored"),
        ("moe_shared_expert_intermediate_size", lambda v: v in (None, config.moe_intermediate_size),
         "shared experts have moe_intermediate_size * num_shared_experts"),
        ("use_bias", lambda v: not v or config.use_qkv_bias, "use_bias without use_qkv_bias is read two ways"),
    )
    for name, ok, why in disagreements:
        value = getattr(config, name, None)
        if not ok(value):
            return f"{name}: {value!r} is not supported ({why})"
    if config.hidden_act != "silu":
        return f"hidden_act: {config.hidden_act!r} (LLaDA2 uses silu)"
    if config.num_experts:
        if config.num_experts % config.n_group:
            return f"n_group: num_experts {config.num_experts} is not a multiple of n_group {config.n_group}"
        if not 1 <= config.topk_group <= config.n_group:
            return f"topk_group: {config.topk_group} must be in [1, n_group={config.n_group}]"
        if not 1 <= config.num_experts_per_tok <= config.topk_group * (config.num_experts // config.n_group):
            return (f"num_experts_per_tok: {config.num_experts_per_tok} exceeds the experts of topk_group "
                    f"{config.topk_group} groups")
    return None


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(dtype)


def rotary_tables(position_ids: torch.Tensor, rope_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin (B, T, rope_dim), rotate-half layout (each frequency twice), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, device=position_ids.device, dtype=torch.float32) / rope_dim))
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of (B, H, T, D) heads; the remaining dims pass unchanged."""
    rope_dim = cos.shape[-1]
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class LLaDA2MoeMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router with expert bias and group-limited top-k; returns (chosen experts, their weights) per token."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (N, E)
        biased = scores + self.expert_bias.float()
        n, experts = biased.shape
        grouped = biased.view(n, self.n_group, experts // self.n_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (N, G)
        keep_groups = group_score.topk(self.topk_group, dim=-1).indices
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
        allowed = group_ok[:, :, None].expand_as(grouped).reshape(n, experts)
        chosen = biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, chosen)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scale


class LLaDA2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = LLaDA2MoeMLP(config.hidden_size,
                                               config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, weights = self.gate(flat)
        # (token, slot) pairs grouped by expert; each expert runs once on its rows. One host read per layer (the
        # group sizes); a grouped GEMM would remove it on GPUs.
        expert_of = chosen.reshape(-1)
        order = expert_of.argsort(stable=True)
        token_of = order // chosen.shape[1]
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=x.device).scatter_add_(
            0, expert_of, torch.ones_like(expert_of)).tolist()
        rows = flat[token_of].split(counts)
        outs = [self.experts[e](part) for e, part in enumerate(rows) if counts[e]]
        y = torch.cat(outs).float() * weights.reshape(-1)[order, None]
        out = torch.zeros_like(flat, dtype=torch.float32).index_add(0, token_of, y)
        out = out.to(x.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' sdpa
        self.is_causal = False
        self.scaling = self.head_dim ** -0.5
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, x, rotary, attention_mask, past_key_values=None, **kwargs):
        from rollout.models.attention import eager_attention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        bsz, length, _ = x.shape
        qkv = self.query_key_value(x).view(bsz, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.config.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = rotary
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        impl = self.config._attn_implementation or "sdpa"
        fn = eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        # No attention dropout: rollout and learner must compute the same distribution (see docs/FIDELITY.md).
        out, _ = fn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.dense(out.reshape(bsz, length, -1))


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        moe = config.num_experts and layer_idx >= config.first_k_dense_replace
        self.mlp = LLaDA2MoeSparseMoeBlock(config) if moe else LLaDA2MoeMLP(config.hidden_size,
                                                                             config.intermediate_size)
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, rotary=None, attention_mask=None, past_key_values=None, **kwargs):
        hidden = hidden + self.attention(self.input_layernorm(hidden), rotary, attention_mask, past_key_values,
                                         **kwargs)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LLaDA2MoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.expert_bias)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        # As released: the pad token's row (LLaDA2's pad is its eos, 156892) gets no gradient.
        pad = config.pad_token_id
        pad = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_dim = int(config.head_dim * config.partial_rotary_factor)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                inputs_embeds=None, **kwargs) -> BaseModelOutputWithPast:
        from rollout.models.attention import MASK_KWARG

        if attention_mask is None and MASK_KWARG not in kwargs:
            raise ValueError("LLaDA2: a forward needs its attention mask (block-causal 4D mask or diffrl's "
                             "description); there is no default layout")
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError(f"LLaDA2: attention_mask must be a (B, 1, Q, K) additive mask, got {attention_mask.dim()}D")
        hidden = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None].expand(
                hidden.shape[0], -1)
        rotary = rotary_tables(position_ids, self.rope_dim, self.config.rope_theta, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, rotary, attention_mask, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel, GenerationMixin):
    """The trunk (`model`) and the vocabulary head (`lm_head`): logits at position i predict token i (no shift).
    GenerationMixin only for what PEFT's causal-LM wrapper expects; HF's autoregressive `generate` is meaningless
    for a diffusion model and diffrl never calls it."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state).float(),
                                      past_key_values=out.past_key_values)


def block_causal_bias(length: int, block_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (1, 1, T, T) additive mask LLaDA2's generate builds: a query in block b sees every key in blocks <= b."""
    block = torch.arange(length) // block_size
    allowed = block[None, :] <= block[:, None]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


__all__ = ["LLaDA2MoeConfig", "LLaDA2MoeModelLM", "MODEL_TYPE", "ARCHITECTURE", "check_config", "block_causal_bias"]
