"""Attention with O(T) mask state: a compact mask description and the kernels that consume it.

Every diffrl forward used to build a dense additive (B, 1, Q, K) float mask (masks.attention_bias): at 4k-token
responses the training layout's mask alone is ~0.5 GB, and it grows with the square of the length. Here the mask is
described per position instead (`AttentionMask`: block ids, copy indices, key validity, document ids, `full`), and
the model's attention layers read that description through transformers' attention interface:

- "flex": PyTorch FlexAttention with a block-sparse `BlockMask` built from the description (attention_flex.py);
  tiles the mask blocks entirely are skipped. Compiled once per shape bucket (and batch size). Forward and backward
  on CUDA (not run here: no GPU in the session that wrote it); on CPU (torch 2.13) FlexAttention has no backward, so
  it serves no-grad forwards only (asking for gradients is a one-line error).
- "chunked": exact, any device (attention_chunked.py): queries in chunks cut at document and clean/noisy
  boundaries, each chunk against only the key segments it can see (its document; in the training layout a noisy
  chunk sees the clean prefix up to its block plus its own noisy blocks), its (C, K') bias built from the
  description. Mask memory O(C x K'); a packed row costs about the sum of its documents. Under autograd the chunks
  run as one autograd Function (CPU: flash-attention forward/backward per chunk from a saved log-sum-exp; elsewhere
  each chunk recomputed in backward) that adds the chunks' gradients in place, so no (Q x K) bias is saved and no
  per-chunk full-size gradient is allocated.
- "dense": the description expanded to the additive mask (the reference, and an explicit fallback).
- "auto": flex on CUDA for forwards of at least FLEX_MIN_QUERIES queries (the training layout, uncached decoding),
  chunked otherwise: a cached decoding step's few queries make a (B, 1, Q, K) mask that is already O(K), and flex
  would pad them to a 128-row tile. On CPU always chunked (BENCHMARKS.md): FlexAttention has no CPU backward in
  torch 2.13 and compiles for every new shape bucket.

The visibility rule (shared with masks.attention_bias; ISSUE 13), n[p] being the position's copy index (0: clean,
c >= 1: noisy copy c; the single-copy training layout has only 0 and 1): query q sees key k iff v[k], d[q] == d[k] and
  full:             True
  otherwise:        (n[k] == 0 & (b[k] < b[q] | (b[k] == b[q] & n[q] == 0))) | (n[k] > 0 & n[q] == n[k] & b[k] == b[q])
                  = b[k] == b[q] ? n[k] == n[q] : (b[k] < b[q] & n[k] == 0)   (the form computed here)
which, with no noisy positions, is b[k] <= b[q] (block-causal). A query row with no visible key (a padding query)
has its output ignored: dense (and the chunked kernel's decoding plan) let it attend everywhere, the chunked
document-aware plan gives it zeros or its chunk's keys, flex returns zeros; none gives NaN. Queries
marked invalid (`q_valid` False: padding of the training layout, which `layout.arrange_rows` marks) are not computed
by the chunked kernel's document-aware plan either (output 0); every consumer ignores padding outputs.

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

log = logging.getLogger(__name__)

KERNELS = ("auto", "dense", "chunked", "flex")
MASK_KWARG = "diffrl_mask"  # the keyword carrying the AttentionMask from the policy's forward to the layers
DISPATCH_PREFIX = "diffrl_"
FLEX_MIN_QUERIES = 128  # auto on CUDA: flex from this many queries on (one FlexAttention tile)


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """Per-position description of a (B, Q, K) attention mask; build with `AttentionMask.build`."""

    q_block: torch.Tensor  # (B, Q) long
    k_block: torch.Tensor  # (B, K) long
    k_valid: torch.Tensor  # (B, K) bool
    # Copy index of each position (masks.py): 0 clean, c >= 1 noisy copy c. Given as bool (True = copy 1, the
    # single-copy layout) or integers; stored as long.
    q_noisy: torch.Tensor  # (B, Q) long
    k_noisy: torch.Tensor  # (B, K) long
    q_doc: torch.Tensor  # (B, Q) long
    k_doc: torch.Tensor  # (B, K) long
    full: bool = False
    documents: bool = False  # document ids were given (a packed batch)
    q_valid: torch.Tensor | None = None  # (B, Q) bool: queries whose output is used (None: every query)
    _memo: dict = field(default_factory=dict, repr=False)  # chunk plans and kept biases of the forward

    @classmethod
    def build(cls, q_block: torch.Tensor, k_block: torch.Tensor, k_valid: torch.Tensor, *,
              q_noisy: torch.Tensor | None = None, k_noisy: torch.Tensor | None = None,
              q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
              full: bool = False, q_valid: torch.Tensor | None = None) -> "AttentionMask":
        """Missing copy indices are all 0 (clean), missing document ids all 0 (one document per row); q_valid None:
        every query's output is used."""
        if q_block.dim() != 2 or k_block.dim() != 2 or k_valid.shape != k_block.shape:
            raise ValueError(f"attention mask: q_block {tuple(q_block.shape)}, k_block {tuple(k_block.shape)}, "
                             f"k_valid {tuple(k_valid.shape)} must be (B, Q), (B, K), (B, K)")
        if (q_noisy is None) != (k_noisy is None) or (q_doc is None) != (k_doc is None):
            raise ValueError("attention mask: noisy flags and document ids come in (query, key) pairs")
        device = q_block.device
        q_noisy = torch.zeros_like(q_block) if q_noisy is None else copy_index(q_noisy)
        k_noisy = torch.zeros_like(k_block) if k_noisy is None else copy_index(k_noisy)
        documents = q_doc is not None
        q_doc = torch.zeros_like(q_block) if q_doc is None else q_doc.long()
        k_doc = torch.zeros_like(k_block) if k_doc is None else k_doc.long()
        if q_valid is not None:
            q_valid = q_valid.bool().to(device)
        for name, t, ref in (("q_noisy", q_noisy, q_block), ("q_doc", q_doc, q_block),
                             ("q_valid", q_block if q_valid is None else q_valid, q_block),
                             ("k_noisy", k_noisy, k_block), ("k_doc", k_doc, k_block)):
            if t.shape != ref.shape:
                raise ValueError(f"attention mask: {name} {tuple(t.shape)} != {tuple(ref.shape)}")
        return cls(q_block.long().to(device), k_block.long().to(device), k_valid.bool().to(device),
                   q_noisy.to(device), k_noisy.to(device), q_doc.to(device), k_doc.to(device), bool(full), documents,
                   q_valid)

    # ------------------------------------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, 1, Q, K), the shape of the dense mask it stands for."""
        return (self.q_block.shape[0], 1, self.q_block.shape[1], self.k_block.shape[1])

    @property
    def device(self) -> torch.device:
        return self.q_block.device

    def to(self, device) -> "AttentionMask":
        q_valid = None if self.q_valid is None else self.q_valid.to(device)
        return self._with(*(t.to(device) for t in self._tensors()), q_valid=q_valid)

    def select_rows(self, index: torch.Tensor) -> "AttentionMask":
        """The batch rows `index` (the dense mask's mask[index])."""
        q_valid = None if self.q_valid is None else self.q_valid[index]
        return self._with(*(t[index] for t in self._tensors()), q_valid=q_valid)

    def query_window(self, lo: int, hi: int) -> "AttentionMask":
        """Queries lo .. hi-1 against every key (the dense mask's mask[:, :, lo:hi, :])."""
        qb, kb, kv, qn, kn, qd, kd = self._tensors()
        q_valid = None if self.q_valid is None else self.q_valid[:, lo:hi]
        return self._with(qb[:, lo:hi], kb, kv, qn[:, lo:hi], kn, qd[:, lo:hi], kd, q_valid=q_valid)

    def _tensors(self):
        return (self.q_block, self.k_block, self.k_valid, self.q_noisy, self.k_noisy, self.q_doc, self.k_doc)

    def _with(self, *tensors, q_valid) -> "AttentionMask":
        return AttentionMask(*tensors, full=self.full, documents=self.documents, q_valid=q_valid)

    # ------------------------------------------------------------------------------------------ the rule
    def visible(self, q_lo: int = 0, q_hi: int | None = None, k_lo: int = 0, k_hi: int | None = None,
                rows: slice = slice(None)) -> torch.Tensor:
        """(B', q_hi - q_lo, k_hi - k_lo) bool: which keys k_lo .. k_hi-1 queries q_lo .. q_hi-1 of batch rows
        `rows` see."""
        q, k = slice(q_lo, q_hi), slice(k_lo, k_hi)
        qb, kb = self.q_block[rows, q, None], self.k_block[rows, None, k]
        qn, kn = self.q_noisy[rows, q, None], self.k_noisy[rows, None, k]
        # visible_pairs, computed in place: at most three (B, C, K) booleans alive instead of eight.
        allowed = self.q_doc[rows, q, None] == self.k_doc[rows, None, k]
        allowed &= self.k_valid[rows, None, k]
        if self.full:
            return allowed
        rule = kb < qb
        rule &= kn == 0
        same = kb == qb
        same &= qn == kn
        rule |= same
        del same
        allowed &= rule
        return allowed

    def dense_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The additive (B, 1, Q, K) mask (0 = attend, dtype-min = blocked), masks.attention_bias's convention."""
        return additive(open_empty_rows_(self.visible()), dtype)[:, None]


def copy_index(flags: torch.Tensor) -> torch.Tensor:
    """Copy indices as long: a bool noisy flag is copy 1 (every single-copy caller), integers are kept."""
    if flags.dtype == torch.bool:
        return flags.long()
    if flags.is_floating_point() or (flags.numel() and bool((flags < 0).any())):
        raise ValueError("attention mask: copy indices are integers >= 0 (0 clean, c >= 1 noisy copy c)")
    return flags.long()


def visible_pairs(qb, kb, qn, kn, kv, qd, kd, full: bool) -> torch.Tensor:
    """The visibility rule on broadcastable per-position tensors (queries on dim -2, keys on dim -1), as one
    expression (FlexAttention's mask_mod). The rule read by block: an earlier block's key is seen when it is clean;
    a key of the query's own block when both have the same copy index (both clean, or both of the same noisy
    copy); a later block's never."""
    allowed = kv & (qd == kd)
    if full:
        return allowed
    return allowed & torch.where(kb == qb, kn == qn, (kb < qb) & (kn == 0))


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
        from rollout.models.attention_chunked import chunked_attention

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


