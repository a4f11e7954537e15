"""FlexAttention under an AttentionMask (attention.py): a block-sparse BlockMask built from the per-position tensors.

- The BlockMask is built tile by tile (TILE x TILE) from the description, a stripe of query rows at a time, so
  building it never holds more than one stripe's (B, S, K) booleans: tiles no query sees are skipped by the
  kernel, tiles every query sees run without calling the mask function, the rest evaluate `mask_mod` per element.
- One `mask_mod` (the training-layout rule with validity, documents and copy indices) serves every layout:
  block-causal masks are that rule with no noisy positions, full attention is it with every block id 0. Its code
  never changes, only the tensors it closes over, so the compiled kernel is reused across forwards of the same shapes.
- Shapes are padded up to buckets (lengths: multiples of TILE up to 1024, then eight steps per doubling; batch: a
  power of two), so compilation happens once per bucket (and head geometry / dtype), not once per length or per
  number of rows still decoding. Padded keys are invalid; padded queries and rows are cut off the output. The per-position tensors are padded too, so `mask_mod` never reads past
  them: transformers' own flex path indexes a dense (B, 1, Q, K) score mask as `mask[b][0][q][kv]` in its
  score_mod, which segfaults the compiled CPU kernel under torch 2.13 (`mask[b, 0, q, kv]` does not; found while
  reproducing "flex_attention crashes on CPU"; diffrl no longer goes through that path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.models.attention import AttentionMask, visible_pairs
from rollout.models.attention_chunked import CHUNK_ELEMENTS

TILE = 128
RECOMPILE_LIMIT = 64  # distinct shape buckets x geometries one process may compile (torch's default is 8)
_compiled = None


def bucket(n: int) -> int:
    """Padded length: a multiple of TILE, at most 1/8 above n beyond 1024 (eight buckets per doubling)."""
    step = max(TILE, 2 ** max(0, (n - 1).bit_length() - 3))
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _padded(mask: AttentionMask, q_pad: int, k_pad: int, b_pad: int) -> dict[str, torch.Tensor]:
    """The description's tensors padded to (b_pad, q_pad) / (b_pad, k_pad), normalised so one rule covers every
    layout (padded rows have no valid key)."""
    q_extra, k_extra = q_pad - mask.q_block.shape[1], k_pad - mask.k_block.shape[1]
    b_extra = b_pad - mask.q_block.shape[0]
    qb, kb = mask.q_block, mask.k_block
    qn, kn = mask.q_noisy, mask.k_noisy
    if mask.full:  # full attention = the general rule with one block and no noisy copy
        qb, kb = torch.zeros_like(qb), torch.zeros_like(kb)
        qn, kn = torch.zeros_like(qn), torch.zeros_like(kn)
    return {
        "qb": F.pad(qb, (0, q_extra, 0, b_extra)), "kb": F.pad(kb, (0, k_extra, 0, b_extra)),
        "qn": F.pad(qn, (0, q_extra, 0, b_extra)), "kn": F.pad(kn, (0, k_extra, 0, b_extra)),
        "qd": F.pad(mask.q_doc, (0, q_extra, 0, b_extra)), "kd": F.pad(mask.k_doc, (0, k_extra, 0, b_extra)),
        "kv": F.pad(mask.k_valid, (0, k_extra, 0, b_extra), value=False),
    }


def _mask_mod(t: dict[str, torch.Tensor]):
    qb, kb, qn, kn, qd, kd, kv = t["qb"], t["kb"], t["qn"], t["kn"], t["qd"], t["kd"], t["kv"]

    def mask_mod(b, h, q, k):
        return visible_pairs(qb[b, q], kb[b, k], qn[b, q], kn[b, k], kv[b, k], qd[b, q], kd[b, k], False)

    return mask_mod


def _tile_flags(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nQ, nK) tile flags -> (count (B, 1, nQ), indices (B, 1, nQ, nK)): flagged tiles first, in order."""
    count = flags.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[:, None], order[:, None]


def build_block_mask(mask: AttentionMask, q_pad: int, k_pad: int, b_pad: int | None = None):
    from torch.nn.attention.flex_attention import BlockMask

    bsz = mask.shape[0] if b_pad is None else b_pad
    t = _padded(mask, q_pad, k_pad, bsz)
    n_q, n_k = q_pad // TILE, k_pad // TILE
    some = torch.zeros((bsz, n_q, n_k), dtype=torch.bool, device=mask.device)
    every = torch.zeros_like(some)
    stripe = max(1, CHUNK_ELEMENTS // max(1, bsz * TILE * k_pad)) * TILE  # query rows per stripe
    for lo in range(0, q_pad, stripe):
        hi = min(q_pad, lo + stripe)
        allowed = visible_pairs(t["qb"][:, lo:hi, None], t["kb"][:, None], t["qn"][:, lo:hi, None],
                                t["kn"][:, None], t["kv"][:, None], t["qd"][:, lo:hi, None], t["kd"][:, None], False)
        tiles = allowed.view(bsz, (hi - lo) // TILE, TILE, n_k, TILE)
        some[:, lo // TILE:hi // TILE] = tiles.any(dim=4).any(dim=2)
        every[:, lo // TILE:hi // TILE] = tiles.all(dim=4).all(dim=2)
    partial_count, partial_idx = _tile_flags(some & ~every)
    full_count, full_idx = _tile_flags(every)
    return BlockMask.from_kv_blocks(partial_count, partial_idx, full_count, full_idx, BLOCK_SIZE=TILE,
                                    mask_mod=_mask_mod(t), seq_lengths=(q_pad, k_pad))


def flex_attention_forward(query, key, value, mask: AttentionMask, scaling) -> torch.Tensor:
    """(B, H, Q, D) queries, (B, Hkv, K, D) keys/values -> (B, H, Q, D), through compiled FlexAttention."""
    q_len, k_len = query.shape[2], key.shape[2]
    if tuple(mask.shape) != (query.shape[0], 1, q_len, k_len):
        raise RuntimeError(f"attention: mask {tuple(mask.shape)} for queries {tuple(query.shape)} and keys "
                           f"{tuple(key.shape)}")
    bsz = query.shape[0]
    q_pad, k_pad, b_pad = bucket(q_len), bucket(k_len), batch_bucket(bsz)
    memo_key = ("flex", q_pad, k_pad, b_pad)
    block_mask = mask._memo.get(memo_key)
    if block_mask is None:  # once per forward: every layer shares it
        block_mask = mask._memo[memo_key] = build_block_mask(mask, q_pad, k_pad, b_pad)
    q = F.pad(query, (0, 0, 0, q_pad - q_len, 0, 0, 0, b_pad - bsz))
    k = F.pad(key, (0, 0, 0, k_pad - k_len, 0, 0, 0, b_pad - bsz))
    v = F.pad(value, (0, 0, 0, k_pad - k_len, 0, 0, 0, b_pad - bsz))
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        out = _kernel()(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out[:bsz, :, :q_len]


def _kernel():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled
