"""Block alignment and attention masks: defined once here, used by decoding and training alike.

Block alignment is a property of the model (DiffusionSpec.block_alignment); positions count from the sequence's
first REAL token, so left padding never changes the layout and a prompt decodes identically alone or in a batch.
- `absolute` (SDAR / TraDo, as trained and as their own generate decodes): blocks are counted from the sequence
  start, position t in block t // B. The prompt's last partial block (its `head`, P mod B tokens) is completed by
  the first response tokens: the first decoding block holds the prompt's tail and the response's head. The tail is
  never masked, but it is computed inside that block, bidirectionally with the block's masked tokens.
- `response` (diffrl's generic block models, and TraceRL's training layout): response position i is in block
  i // B; the prompt is cut into blocks counted *backwards from its end*, so its last block ends exactly where the
  response starts (its first block may be short).
Both are one formula: the first decoding block starts at the sequence position `block_origin` (P under `response`,
P rounded down to a multiple of B under `absolute`), and position t belongs to block floor((t - origin) / B).
Decoders and the training layout work on the *canvas* `[prompt tail | response]` that starts at the origin, so
every decoding block is B canvas positions whatever the alignment.

Block ids: blocks before the origin get negative ids (-1 is the block just before it), decoding blocks 0, 1, ...
A query sees a key when the key's block is earlier, or the same block (bidirectional inside a block).

The training layout `[prompt | clean response | noisy canvas]` adds a second, noisy copy of the canvas. A position
is "noisy" when it belongs to that copy: a noisy query sees clean keys of strictly earlier blocks (and the prompt),
and noisy keys only of its own block; clean queries never see noisy keys. The shared-clean layout
`[prompt | clean response | noisy canvas 1 | ... | noisy canvas G]` (the trajectory estimator's G passes in one
forward) numbers the copies: each position has a copy index n (0 clean, c >= 1 noisy copy c; the single-copy layout
has only 0 and 1), and a noisy key is seen only by noisy queries of its own block AND its own copy. Clean states
never see a noisy key, so they are the same however many copies follow, and each copy sees exactly what it would
see alone.

Packing: several samples ("documents") may share one row. Every position then also carries a document id, and a
query sees a key only within its own document (padding positions are invalid keys whatever their id); position ids
restart at 0 per document. Per position p of a row: block id b[p], copy index n[p], key validity v[p], document
id d[p]; query q sees key k iff v[k] and d[q] == d[k] and rule(b, n), rule being True (full attention),
b[k] <= b[q] (block models without a noisy copy) or the training-layout rule above. The layout builder
(layout.arrange_rows) hands these per-position tensors to the attention kernels as one `attention.AttentionMask`;
`attention_bias` here is the dense rule written independently of those kernels, the reference they are tested
against.

Masks are additive float tensors (0 = attend, dtype-min = blocked) of shape (B, 1, Q, K): transformers honours
custom 4D float masks with sdpa and eager, while a bool mask with eager is silently wrong.
"""
from __future__ import annotations

import torch

# The origin rule itself is plain integer arithmetic and lives in spec.py (importable without torch, for recipes).
from rollout.models.spec import ALIGNMENTS, block_origin, check_alignment  # noqa: F401  (re-exported)

# Block id given to padding positions; they are excluded through the key-validity mask, never by id.
PAD_BLOCK = 2**30


def block_ids(start: int, length: int, origin: int, block_size: int) -> torch.Tensor:
    """Block ids of sequence positions start .. start+length-1 when decoding block 0 starts at `origin`."""
    return torch.div(torch.arange(start, start + length) - origin, block_size, rounding_mode="floor")


def prompt_block_ids(prompt_len: int, block_size: int, alignment: str = "response") -> torch.Tensor:
    """Block ids of a prompt's positions (its tail gets block 0 under `absolute` alignment)."""
    return block_ids(0, prompt_len, block_origin(prompt_len, block_size, alignment), block_size)


def response_block_ids(response_len: int, block_size: int, offset: int = 0) -> torch.Tensor:
    """Block ids of canvas positions offset .. offset+response_len-1 (the canvas starts at the origin)."""
    return torch.arange(offset, offset + response_len) // block_size


def attention_bias(
    q_block: torch.Tensor,
    k_block: torch.Tensor,
    k_valid: torch.Tensor,
    *,
    q_noisy: torch.Tensor | None = None,
    k_noisy: torch.Tensor | None = None,
    full: bool = False,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive mask (B, 1, Q, K) from per-position block ids (B, Q) / (B, K) and key validity (B, K).

    full=True gives bidirectional attention over every valid key (LLaDA/Dream). q_doc / k_doc (document ids of
    packed rows; both or neither) keep attention inside each document. Queries at padding positions still see
    something (never a fully blocked row), so no NaN can appear; their outputs are ignored.
    """
    if (q_doc is None) != (k_doc is None):
        raise ValueError("attention_bias: give both q_doc and k_doc, or neither")
    valid = k_valid[:, None, :].bool()
    if full:
        allowed = valid.expand(-1, q_block.shape[1], -1)
    else:
        qb = q_block[:, :, None]
        kb = k_block[:, None, :]
        if q_noisy is None:
            allowed = kb <= qb
        else:
            # Copy indices (a bool flag is copy 1): a clean key is seen from later blocks, and from its own block by
            # clean queries; a noisy key only from its own block by queries of the same noisy copy.
            qn = q_noisy[:, :, None].long()
            kn = k_noisy[:, None, :].long()
            key_clean = kn == 0
            clean_key_seen = key_clean & ((kb < qb) | ((kb == qb) & (qn == 0)))
            noisy_key_seen = ~key_clean & (qn == kn) & (kb == qb)
            allowed = clean_key_seen | noisy_key_seen
        allowed = allowed & valid
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    # A query row with no visible key (a padding query) attends to everything instead of producing NaN.
    empty_row = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty_row
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_block.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def sequence_block_ids(prompt_len: int, response_len: int, block_size: int,
                       alignment: str = "response") -> torch.Tensor:
    """Block ids of `prompt + response` laid out as one sequence (decoding's layout, no padding)."""
    origin = block_origin(prompt_len, block_size, alignment)
    return block_ids(0, prompt_len + response_len, origin, block_size)


def sequence_bias(prompt_len: int, response_len: int, block_size: int, *, full: bool = False,
                  alignment: str = "response", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 1, T, T) mask for one unpadded `prompt + response` sequence."""
    blocks = sequence_block_ids(prompt_len, response_len, block_size, alignment)[None]
    valid = torch.ones_like(blocks, dtype=torch.bool)
    return attention_bias(blocks, blocks, valid, full=full, dtype=dtype)

