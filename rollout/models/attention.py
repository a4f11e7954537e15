"""Attention with O(T) mask state: a compact mask description and the kernels that consume it.

Every diffrl forward used to build a dense additive (B, 1, Q, K) float mask (masks.attention_bias): at 4k-token
responses the training layout's mask alone is ~0.5 GB, and it grows with the square of the length. Here the mask is
described per position instead (`AttentionMask`: block ids, noisy flags, key validity, document ids, `full`), and
the model's attention layers read that description through transformers' attention interface:

- "flex": PyTorch FlexAttention with a block-sparse `BlockMask` built from the description (attention_flex.py);
  tiles the mask blocks entirely are skipped. Compiled once per shape bucket (and batch size). Forward and backward
  on CUDA (not run here: no GPU in the session that wrote it); on CPU (torch 2.13) FlexAttention has no backward, so
  it serves no-grad forwards only (asking for gradients is a one-line error).
- "chunked": exact, any device: queries in chunks of C rows, each chunk's (C, K') bias built from the description,
  K' trimmed to the key columns the chunk can see, SDPA on the chunk. Mask memory O(C x K) instead of O(Q x K).
  Under autograd a chunk whose bias is not kept is recomputed in backward (torch.utils.checkpoint), so no
  (Q x K) bias per layer is saved for backward.
- "dense": the description expanded to the additive mask (the reference, and an explicit fallback).
- "auto": flex on CUDA for forwards of at least FLEX_MIN_QUERIES queries (the training layout, uncached decoding),
  chunked otherwise: a cached decoding step's few queries make a (B, 1, Q, K) mask that is already O(K), and flex
  would pad them to a 128-row tile. On CPU always chunked (BENCHMARKS.md): FlexAttention has no CPU backward in
  torch 2.13 and compiles for every new shape bucket.

The visibility rule (shared with masks.attention_bias; ISSUE 13): query q sees key k iff v[k], d[q] == d[k] and
  full:             True
  otherwise:        (~n[k] & (b[k] < b[q] | (b[k] == b[q] & ~n[q]))) | (n[k] & n[q] & b[k] == b[q])
                  = b[k] == b[q] ? n[k] == n[q] : (b[k] < b[q] & ~n[k])   (the form computed here)
which, with no noisy positions, is b[k] <= b[q] (block-causal). A query row with no visible key (a padding query)
has its output ignored: dense and chunked let it attend everywhere, flex returns zeros; neither gives NaN.

How the description reaches the layers: the policy passes it as the keyword `diffrl_mask` (transformers forwards
extra keywords from the model's forward down to the attention function) with attention_mask=None, and the model's
config names a dispatcher registered here (`diffrl_<base>`, base = sdpa / eager / flex_attention): it runs our
kernels when `diffrl_mask` is given and the base implementation, unchanged, otherwise (dense tensors). The name
stays installed (HF gradient checkpointing re-runs attention in backward, after the forward returned).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

KERNELS = ("auto", "dense", "chunked", "flex")
MASK_KWARG = "diffrl_mask"  # the keyword carrying the AttentionMask from the policy's forward to the layers
DISPATCH_PREFIX = "diffrl_"
# Chunked kernel: elements of one chunk's (B, C, K) mask; the chunk's rows C follow from it (at least MIN_ROWS).
# Measured (BENCHMARKS.md): 64-row chunks left glibc holding far less freed memory than 16-row ones.
CHUNK_ELEMENTS = 2 ** 20
MIN_ROWS = 64
# Chunk biases kept for the layers of one forward, in elements: every layer reuses the same additive tensors, so
# autograd saves them once (a bias built per layer would be saved per layer).
KEEP_ELEMENTS = 2 ** 23
FLEX_MIN_QUERIES = 128  # auto on CUDA: flex from this many queries on (one FlexAttention tile)


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """Per-position description of a (B, Q, K) attention mask; build with `AttentionMask.build`."""

    q_block: torch.Tensor  # (B, Q) long
    k_block: torch.Tensor  # (B, K) long
    k_valid: torch.Tensor  # (B, K) bool
    q_noisy: torch.Tensor  # (B, Q) bool
    k_noisy: torch.Tensor  # (B, K) bool
    q_doc: torch.Tensor  # (B, Q) long
    k_doc: torch.Tensor  # (B, K) long
    full: bool = False
    documents: bool = False  # document ids were given (a packed batch)
    _memo: dict = field(default_factory=dict, repr=False)  # chunk plans and kept biases of the forward

    @classmethod
    def build(cls, q_block: torch.Tensor, k_block: torch.Tensor, k_valid: torch.Tensor, *,
              q_noisy: torch.Tensor | None = None, k_noisy: torch.Tensor | None = None,
              q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
              full: bool = False) -> "AttentionMask":
        """Missing noisy flags are all False, missing document ids all 0 (one document per row)."""
        if q_block.dim() != 2 or k_block.dim() != 2 or k_valid.shape != k_block.shape:
            raise ValueError(f"attention mask: q_block {tuple(q_block.shape)}, k_block {tuple(k_block.shape)}, "
                             f"k_valid {tuple(k_valid.shape)} must be (B, Q), (B, K), (B, K)")
        if (q_noisy is None) != (k_noisy is None) or (q_doc is None) != (k_doc is None):
            raise ValueError("attention mask: noisy flags and document ids come in (query, key) pairs")
        device = q_block.device
        q_noisy = torch.zeros_like(q_block, dtype=torch.bool) if q_noisy is None else q_noisy.bool()
        k_noisy = torch.zeros_like(k_block, dtype=torch.bool) if k_noisy is None else k_noisy.bool()
        documents = q_doc is not None
        q_doc = torch.zeros_like(q_block) if q_doc is None else q_doc.long()
        k_doc = torch.zeros_like(k_block) if k_doc is None else k_doc.long()
        for name, t, ref in (("q_noisy", q_noisy, q_block), ("q_doc", q_doc, q_block),
                             ("k_noisy", k_noisy, k_block), ("k_doc", k_doc, k_block)):
            if t.shape != ref.shape:
                raise ValueError(f"attention mask: {name} {tuple(t.shape)} != {tuple(ref.shape)}")
        return cls(q_block.long().to(device), k_block.long().to(device), k_valid.bool().to(device),
                   q_noisy.to(device), k_noisy.to(device), q_doc.to(device), k_doc.to(device), bool(full), documents)

    # ------------------------------------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, 1, Q, K), the shape of the dense mask it stands for."""
        return (self.q_block.shape[0], 1, self.q_block.shape[1], self.k_block.shape[1])

    @property
    def device(self) -> torch.device:
        return self.q_block.device

    def to(self, device) -> "AttentionMask":
        return AttentionMask(*(t.to(device) for t in self._tensors()), full=self.full, documents=self.documents)

    def select_rows(self, index: torch.Tensor) -> "AttentionMask":
        """The batch rows `index` (the dense mask's mask[index])."""
        return AttentionMask(*(t[index] for t in self._tensors()), full=self.full, documents=self.documents)

    def query_window(self, lo: int, hi: int) -> "AttentionMask":
        """Queries lo .. hi-1 against every key (the dense mask's mask[:, :, lo:hi, :])."""
        qb, kb, kv, qn, kn, qd, kd = self._tensors()
        return AttentionMask(qb[:, lo:hi], kb, kv, qn[:, lo:hi], kn, qd[:, lo:hi], kd, full=self.full, documents=self.documents)

    def _tensors(self):
        return (self.q_block, self.k_block, self.k_valid, self.q_noisy, self.k_noisy, self.q_doc, self.k_doc)

    # ------------------------------------------------------------------------------------------ the rule
    def visible(self, q_lo: int = 0, q_hi: int | None = None, k_lo: int = 0, k_hi: int | None = None) -> torch.Tensor:
        """(B, q_hi - q_lo, k_hi - k_lo) bool: which keys k_lo .. k_hi-1 queries q_lo .. q_hi-1 see."""
        q, k = slice(q_lo, q_hi), slice(k_lo, k_hi)
        qb, kb = self.q_block[:, q, None], self.k_block[:, None, k]
        qn, kn = self.q_noisy[:, q, None], self.k_noisy[:, None, k]
        # visible_pairs, computed in place: at most three (B, C, K) booleans alive instead of eight.
        allowed = self.q_doc[:, q, None] == self.k_doc[:, None, k]
        allowed &= self.k_valid[:, None, k]
        if self.full:
            return allowed
        rule = kb < qb
        rule &= ~kn
        same = kb == qb
        same &= qn == kn
        rule |= same
        del same
        allowed &= rule
        return allowed

    def dense_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The additive (B, 1, Q, K) mask (0 = attend, dtype-min = blocked), masks.attention_bias's convention."""
        return additive(open_empty_rows_(self.visible()), dtype)[:, None]


def visible_pairs(qb, kb, qn, kn, kv, qd, kd, full: bool) -> torch.Tensor:
    """The visibility rule on broadcastable per-position tensors (queries on dim -2, keys on dim -1), as one
    expression (FlexAttention's mask_mod). The rule read by block: an earlier block's key is seen when it is clean;
    a key of the query's own block when both are clean or both noisy; a later block's never."""
    allowed = kv & (qd == kd)
    if full:
        return allowed
    return allowed & torch.where(kb == qb, kn == qn, (kb < qb) & ~kn)


def open_empty_rows_(allowed: torch.Tensor) -> torch.Tensor:
    """In place: a query row with no visible key attends everywhere instead of producing NaN (output ignored)."""
    return allowed.logical_or_(~allowed.any(dim=-1, keepdim=True))


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, dtype-min elsewhere (one allocation)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------- kernel choice
def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"model.attention_kernel: unknown kernel {kernel!r} (expected one of {', '.join(KERNELS)})")
    return kernel


def resolve_kernel(kernel: str, device: torch.device, needs_grad: bool, q_len: int | None = None) -> str:
    """The kernel a forward of `q_len` queries runs: `auto` is flex on CUDA (when FlexAttention imports) for
    at least FLEX_MIN_QUERIES queries, chunked otherwise."""
    check_kernel(kernel)
    if kernel == "auto":
        large = q_len is None or q_len >= FLEX_MIN_QUERIES
        return "flex" if device.type == "cuda" and large and flex_available() else "chunked"
    if kernel == "flex":
        if not flex_available():
            raise RuntimeError(f"model.attention_kernel: flex needs torch.nn.attention.flex_attention "
                               f"(torch {torch.__version__} has none); use chunked")
        if needs_grad and device.type == "cpu":
            raise RuntimeError(f"model.attention_kernel: flex has no backward on CPU (torch {torch.__version__}'s "
                               "FlexAttention); use chunked or auto for training on CPU")
    return kernel


_LOGGED: set[str] = set()
KERNEL_NAMES = {"flex": "flex (BlockMask)", "chunked": "chunked (exact, O(T) mask state)",
                "dense": "dense (B, 1, T, T) additive mask"}


def log_kernel_once(kernel: str) -> None:
    if kernel not in _LOGGED:
        _LOGGED.add(kernel)
        log.info("attention: %s", KERNEL_NAMES[kernel])


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ transformers glue
def install(model: torch.nn.Module) -> str:
    """Point `model.config` at the dispatcher wrapping its current attention implementation; returns the base."""
    config = model.config
    current = config._attn_implementation or "sdpa"
    base = current[len(DISPATCH_PREFIX):] if current.startswith(DISPATCH_PREFIX) else current
    name = DISPATCH_PREFIX + base
    _register(name, base)
    config._attn_implementation = name
    return base


def base_implementation(config) -> str:
    """The attention implementation a config was loaded with (under the dispatcher's name)."""
    name = config._attn_implementation or "sdpa"
    return name[len(DISPATCH_PREFIX):] if name.startswith(DISPATCH_PREFIX) else name


def _register(name: str, base: str) -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS:
        return
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"model.attn_implementation: {base!r} is not a transformers attention implementation")

    def dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        call = kwargs.pop(MASK_KWARG, None)
        if call is None:  # a dense tensor (or none): the base implementation, untouched
            fn = eager_attention if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if attention_mask is not None:
            raise RuntimeError("attention: both a dense attention_mask and a diffrl mask description were given")
        if dropout:
            raise RuntimeError("attention: diffrl's kernels run without attention dropout")
        return run_kernel(call.kernel, query, key, value, call.description, scaling)

    AttentionInterface.register(name, dispatch)


@dataclass(frozen=True)
class KernelCall:
    """What the policy hands the layers: the description and the kernel resolved for this forward."""

    description: AttentionMask
    kernel: str


def run_kernel(kernel: str, query, key, value, mask: AttentionMask, scaling) -> tuple[torch.Tensor, None]:
    """(B, H, Q, D) queries and (B, Hkv, K, D) keys/values -> ((B, Q, H, D) output, None), transformers' layout."""
    if kernel == "flex":
        from rollout.models.attention_flex import flex_attention_forward

        out = flex_attention_forward(query, key, value, mask, scaling)
    elif kernel == "chunked":
        out = chunked_attention(query, key, value, mask, scaling)
    elif kernel == "dense":
        bias = mask.dense_bias(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    else:
        raise ValueError(f"attention: kernel {kernel!r} is not runnable (resolve 'auto' first)")
    return out.transpose(1, 2).contiguous(), None


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention of Llama/Qwen2/Qwen3 (each model file has the same one)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# -------------------------------------------------------------------------------------- chunked kernel
@dataclass(frozen=True)
class _Chunk:
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int


def chunk_plan(mask: AttentionMask) -> list[_Chunk]:
    """Query chunks and the key columns each can see (computed once per forward, then shared by the layers)."""
    plan = mask._memo.get("plan")
    if plan is not None:
        return plan
    bsz, _, q_len, k_len = mask.shape
    rows = max(MIN_ROWS, CHUNK_ELEMENTS // max(1, bsz * k_len))
    # Trimming reads the chunk's key range back (a host sync per chunk and forward): worth it only when there are
    # several chunks of a block layout. A single chunk (decoding: a block of queries) or full attention (every
    # valid key seen) keeps every column and reads nothing back, so decoding steps stay at one host sync.
    trim = q_len > rows and not mask.full
    plan, kept = [], 0
    for q_lo in range(0, q_len, rows):
        q_hi = min(q_len, q_lo + rows)
        allowed = mask.visible(q_lo, q_hi)
        k_lo, k_hi = 0, k_len
        if trim:
            seen = allowed.any(dim=1).any(dim=0).nonzero()  # key columns some query of the chunk sees
            if seen.numel():
                k_lo, k_hi = int(seen[0]), int(seen[-1]) + 1
        chunk = _Chunk(q_lo, q_hi, k_lo, k_hi)
        plan.append(chunk)
        size = bsz * (q_hi - q_lo) * (k_hi - k_lo)
        if kept + size <= KEEP_ELEMENTS:  # short sequences: every layer reuses the chunk's mask
            kept += size
            mask._memo[chunk] = open_empty_rows_(allowed[:, :, k_lo:k_hi].clone())  # bool until the dtype is known
    mask._memo["plan"] = plan
    return plan


def _chunk_bias(mask: AttentionMask, chunk: _Chunk, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's additive (B, 1, C, K') bias: built once per forward for kept chunks, else now."""
    allowed = mask._memo.get(chunk)
    if allowed is None:
        allowed = open_empty_rows_(mask.visible(chunk.q_lo, chunk.q_hi, chunk.k_lo, chunk.k_hi))
        return additive(allowed, dtype)[:, None]
    bias = mask._memo.get((chunk, dtype))
    if bias is None:
        bias = mask._memo[(chunk, dtype)] = additive(allowed, dtype)[:, None]
    return bias


def _chunk_attention(query, key, value, mask: AttentionMask, chunk: _Chunk, scaling) -> torch.Tensor:
    bias = _chunk_bias(mask, chunk, query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                          enable_gqa=key.shape[1] != query.shape[1])


def chunked_attention(query, key, value, mask: AttentionMask, scaling) -> torch.Tensor:
    """Exact attention under `mask`, chunk by chunk: (B, H, Q, D) -> (B, H, Q, D)."""
    if tuple(mask.shape) != (query.shape[0], 1, query.shape[2], key.shape[2]):
        raise RuntimeError(f"attention: mask {tuple(mask.shape)} for queries {tuple(query.shape)} and keys "
                           f"{tuple(key.shape)}")
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if key.shape[1] != query.shape[1] and query.device.type != "cpu":
        # Masked GQA sends CUDA SDPA to its math kernel (transformers repeats the KV heads for the same reason).
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    plan = chunk_plan(mask)
    # split, not one slice per chunk: its backward writes every chunk's query gradient into one tensor, where each
    # slice's backward would zero-fill a full (B, H, Q, D) gradient (O(Q^2 / C) traffic per layer).
    queries = query.split([c.q_hi - c.q_lo for c in plan], dim=2)
    outs = []
    for chunk, q in zip(plan, queries, strict=True):
        full_keys = chunk.k_lo == 0 and chunk.k_hi == key.shape[2]
        k = key if full_keys else key[:, :, chunk.k_lo:chunk.k_hi]
        v = value if full_keys else value[:, :, chunk.k_lo:chunk.k_hi]
        if grad and chunk not in mask._memo:
            # The chunk's bias is built here, per layer: recompute it (and the chunk) in backward rather than
            # let autograd keep one (C x K') bias per chunk per layer, which would sum to O(T^2) per layer.
            outs.append(checkpoint(_chunk_attention, q, k, v, mask, chunk, scaling, use_reentrant=False))
        else:
            outs.append(_chunk_attention(q, k, v, mask, chunk, scaling))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
