"""The chunked attention kernel: exact attention under an AttentionMask (attention.py), one query chunk at a time, each
chunk against only the key segments it can see.

Plans (computed once per forward from the description, then shared by every layer; `chunk_plan`):
- document-aware (a mask with document ids or query validity: every training-layout forward, `layout.arrange_rows`):
  each batch row's queries are cut where the document, the copy index (clean / noisy copy c) or the query validity
  changes, then into chunks of at most `rows` queries. A chunk's key set is the union of what its queries see,
  computed in O(K) from the rule (`keys_seen`), and cut into contiguous segments: in the training layout
  `[prompt | clean | noisy]` (or its several noisy copies) a clean chunk sees its document's clean prefix up to its
  last block (one segment), a noisy chunk that prefix up to its block plus its own noisy blocks in its own copy
  (two), never another document or copy. A packed row
  therefore costs about the sum of its documents' costs, and a padded row about its own sample's (invalid
  queries, the padding, are skipped: output 0; no consumer reads it). Rows whose plans are equal run batched;
  otherwise row by row.
- contiguous (no documents, no query validity: decoding): chunks of `rows` queries of all rows, each trimmed to the
  contiguous key range its queries see (a single chunk keeps every key: one host sync per decoding step).

Execution: the chunk's (B', 1, C, K') additive bias is built from the description (kept across layers while they
fit in KEEP_ELEMENTS), its keys/values are the segments (a view for one, a copy for several) and SDPA runs it.
Under autograd (more than one chunk) the whole forward is one autograd Function (`_ChunkedFunction`): on CPU it
saves query, key, value, the output and each chunk's log-sum-exp, and its backward runs the CPU flash-attention
backward per chunk (the op SDPA's own autograd calls); elsewhere it saves query, key and value and recomputes each
chunk. Either way the chunks' gradients are added into one query/key/value gradient each, in place. Autograd over per-chunk slices would instead
allocate a zero-filled full-size key/value gradient per chunk and layer (the superlinear peak RSS of BENCHMARKS.md:
glibc kept those 1-4 MiB buffers), and checkpointing per chunk would save a bias per chunk and layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollout.models.attention import AttentionMask, additive, open_empty_rows_

# Elements of one chunk's (B, C, K) mask; the chunk's rows C follow from it (at least MIN_ROWS).
# Measured (BENCHMARKS.md): 64-row chunks left glibc holding far less freed memory than 16-row ones.
CHUNK_ELEMENTS = 2 ** 20
MIN_ROWS = 64
# Chunk biases kept for the layers of one forward, in elements: every layer reuses the same additive tensors, so
# autograd saves them once (a bias built per layer would be saved per layer).
KEEP_ELEMENTS = 2 ** 23
# Document-aware chunks have at most this many queries (measured best, BENCHMARKS.md): a chunk computes the union of
# what its queries see, ~rows^2 / 2 masked pairs more than they need (a short row's CHUNK_ELEMENTS allows ~800 rows).
DOCUMENT_ROWS = 64
# Key segments of one chunk: runs of visible keys closer than MIN_GAP columns are joined (the gap is masked, not
# cut: a cut costs a copy of the keys), and at most MAX_SEGMENTS remain (the narrowest gaps joined first).
MIN_GAP = 32
MAX_SEGMENTS = 4


@dataclass(frozen=True)
class Chunk:
    """Queries q_lo .. q_hi-1 of batch row `row` (None: every row) against the key columns of `segments`."""

    row: int | None
    q_lo: int
    q_hi: int
    segments: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> slice:
        return slice(None) if self.row is None else slice(self.row, self.row + 1)

    @property
    def width(self) -> int:
        return sum(hi - lo for lo, hi in self.segments)


# ------------------------------------------------------------------------------------------------- plans
def chunk_rows(mask: AttentionMask) -> int:
    bsz, _, _, k_len = mask.shape
    return max(MIN_ROWS, CHUNK_ELEMENTS // max(1, bsz * k_len))


def chunk_plan(mask: AttentionMask) -> list[Chunk]:
    """The forward's chunks (memoised on the mask: every layer shares them), their kept biases stored with them."""
    plan = mask._memo.get("plan")
    if plan is None:
        aware = mask.documents or mask.q_valid is not None
        rows = chunk_rows(mask)
        plan = document_plan(mask, min(rows, DOCUMENT_ROWS)) if aware else contiguous_plan(mask, rows)
        kept = 0
        for chunk in plan:
            size = (mask.shape[0] if chunk.row is None else 1) * (chunk.q_hi - chunk.q_lo) * chunk.width
            if kept + size > KEEP_ELEMENTS:
                break
            kept += size
            mask._memo[chunk] = chunk_allowed(mask, chunk)  # bool until the dtype is known
        mask._memo["plan"] = plan
    return plan


def contiguous_plan(mask: AttentionMask, rows: int) -> list[Chunk]:
    """Chunks of `rows` queries over every batch row, each trimmed to one contiguous key range (decoding)."""
    _, _, q_len, k_len = mask.shape
    # Trimming reads each chunk's key range back (a host sync per chunk): only for several chunks of a block
    # layout. A single chunk (a decoding step) or full attention (every valid key seen) keeps every column.
    trim = q_len > rows and not mask.full
    plan = []
    for q_lo in range(0, q_len, rows):
        q_hi = min(q_len, q_lo + rows)
        k_lo, k_hi = 0, k_len
        if trim:
            seen = mask.visible(q_lo, q_hi).any(dim=1).any(dim=0).nonzero()
            if seen.numel():
                k_lo, k_hi = int(seen[0]), int(seen[-1]) + 1
        plan.append(Chunk(None, q_lo, q_hi, ((k_lo, k_hi),)))
    return plan


def document_plan(mask: AttentionMask, rows: int) -> list[Chunk]:
    """Chunks cut at document / copy / validity changes, each against the key segments it sees."""
    per_row = [row_chunks(mask, b, rows) for b in range(mask.shape[0])]
    if all(chunks == per_row[0] for chunks in per_row[1:]):
        return [Chunk(None, lo, hi, segments) for lo, hi, segments in per_row[0]]
    return [Chunk(b, lo, hi, segments) for b, chunks in enumerate(per_row) for lo, hi, segments in chunks]


def row_chunks(mask: AttentionMask, b: int, rows: int) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """Row b's chunks as (q_lo, q_hi, segments); runs of invalid queries and chunks that see no key are left out."""
    q_len = mask.shape[2]
    doc, noisy = mask.q_doc[b], mask.q_noisy[b]
    change = (doc[1:] != doc[:-1]) | (noisy[1:] != noisy[:-1])
    valid = None if mask.q_valid is None else mask.q_valid[b]
    if valid is not None:
        change |= valid[1:] != valid[:-1]
    cuts = [0] + (change.nonzero().flatten() + 1).tolist() + [q_len]
    used = None if valid is None else valid[torch.tensor(cuts[:-1], device=valid.device)].tolist()
    firsts = doc[torch.tensor(cuts[:-1], device=doc.device)].tolist()
    spans: dict[int, tuple[int, int] | None] = {}  # document -> the key columns from its first to its last
    out = []
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        if used is not None and not used[i]:
            continue
        if firsts[i] not in spans:
            cols = (mask.k_doc[b] == firsts[i]).nonzero().flatten()
            spans[firsts[i]] = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else None
        if spans[firsts[i]] is None:
            continue
        k_lo, k_hi = spans[firsts[i]]  # keys_seen reads only these: O(document) per chunk, not O(row)
        pieces = -(-(hi - lo) // rows)
        bounds = [lo + (hi - lo) * j // pieces for j in range(pieces + 1)]
        for q_lo, q_hi in zip(bounds[:-1], bounds[1:]):
            segments = key_segments(keys_seen(mask, b, q_lo, q_hi, k_lo, k_hi), offset=k_lo)
            if segments:
                out.append((q_lo, q_hi, segments))
    return out


def keys_seen(mask: AttentionMask, b: int, q_lo: int, q_hi: int, k_lo: int = 0, k_hi: int | None = None
              ) -> torch.Tensor:
    """(k_hi - k_lo,) bool: a superset of the keys k_lo .. k_hi-1 some query q_lo .. q_hi-1 of row b sees, from the
    rule in O(K + C): a
    clean query of block j sees clean keys of blocks <= j; a query of noisy copy c clean keys of blocks < j and
    the noisy keys of block j in copy c. Documents, noisy blocks and copies are taken as the chunk's [min, max]
    ranges (exact for the chunks `row_chunks` cuts: one document, one copy, consecutive blocks); a superset only
    costs masked columns."""
    qb, qn, qd = mask.q_block[b, q_lo:q_hi], mask.q_noisy[b, q_lo:q_hi], mask.q_doc[b, q_lo:q_hi]
    k = slice(k_lo, k_hi)
    kb, kn, kd = mask.k_block[b, k], mask.k_noisy[b, k], mask.k_doc[b, k]
    seen = mask.k_valid[b, k] & (kd >= qd.min()) & (kd <= qd.max())
    if mask.full:
        return seen
    rule = torch.zeros_like(seen)
    q_clean, k_clean = qn == 0, kn == 0
    clean_blocks, noisy_blocks, copies = qb[q_clean], qb[~q_clean], qn[~q_clean]
    if clean_blocks.numel():
        rule |= k_clean & (kb <= clean_blocks.max())
    if noisy_blocks.numel():
        low, high = noisy_blocks.min(), noisy_blocks.max()
        rule |= k_clean & (kb < high)
        # Only the noisy keys of the chunk's own copies (one copy: `row_chunks` cuts where the copy changes).
        rule |= ~k_clean & (kn >= copies.min()) & (kn <= copies.max()) & (kb >= low) & (kb <= high)
    return seen & rule


def key_segments(seen: torch.Tensor, offset: int = 0) -> tuple[tuple[int, int], ...]:
    """Runs of True in `seen` as (offset + lo, offset + hi) column ranges, gaps under MIN_GAP joined, at most
    MAX_SEGMENTS."""
    idx = seen.nonzero().flatten()
    if idx.numel() == 0:
        return ()
    breaks = ((idx[1:] - idx[:-1]) > 1).nonzero().flatten()
    starts = [int(idx[0])] + idx[breaks + 1].tolist()
    ends = idx[breaks].tolist() + [int(idx[-1])]
    runs = [[lo, hi + 1] for lo, hi in zip(starts, ends)]
    while len(runs) > 1:
        gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
        i = min(range(len(gaps)), key=gaps.__getitem__)
        if gaps[i] >= MIN_GAP and len(runs) <= MAX_SEGMENTS:
            break
        runs[i][1] = runs.pop(i + 1)[1]
    return tuple((offset + lo, offset + hi) for lo, hi in runs)


# ------------------------------------------------------------------------------------------------ biases
def chunk_allowed(mask: AttentionMask, chunk: Chunk) -> torch.Tensor:
    """(B', C, K') bool: what the chunk's queries see of its segments (a query that sees none: every column)."""
    parts = [mask.visible(chunk.q_lo, chunk.q_hi, lo, hi, rows=chunk.rows) for lo, hi in chunk.segments]
    return open_empty_rows_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))


def chunk_bias(mask: AttentionMask, chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's additive (B', 1, C, K') bias: once per forward for kept chunks, else now."""
    allowed = mask._memo.get(chunk)
    if allowed is None:
        return additive(chunk_allowed(mask, chunk), dtype)[:, None]
    bias = mask._memo.get((chunk, dtype))
    if bias is None:
        bias = mask._memo[(chunk, dtype)] = additive(allowed, dtype)[:, None]
    return bias


# ------------------------------------------------------------------------------------------------ kernel
def gather_keys(t: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The chunk's rows and key segments of a (B, H, K, D) tensor (a view for one segment)."""
    rows = t[chunk.rows]
    if len(chunk.segments) == 1:
        lo, hi = chunk.segments[0]
        return rows if lo == 0 and hi == t.shape[2] else rows[:, :, lo:hi]
    return torch.cat([rows[:, :, lo:hi] for lo, hi in chunk.segments], dim=2)


def attend(query, key, value, mask: AttentionMask, chunk: Chunk, scaling) -> torch.Tensor:
    """SDPA of the chunk's (B', H, C, D) queries on its gathered keys/values."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=chunk_bias(mask, chunk, query.dtype),
                                          scale=scaling, enable_gqa=key.shape[1] != query.shape[1])


def run_plan(query, key, value, mask: AttentionMask, plan: list[Chunk], scaling) -> torch.Tensor:
    """Every chunk's output written into one (B, H, Q, D) tensor; queries no chunk covers stay 0."""
    out = query.new_zeros(query.shape)
    for chunk in plan:
        q = query[chunk.rows, :, chunk.q_lo:chunk.q_hi]
        out[chunk.rows, :, chunk.q_lo:chunk.q_hi] = attend(q, gather_keys(key, chunk), gather_keys(value, chunk),
                                                          mask, chunk, scaling)
    return out


def add_segments_(total: torch.Tensor, part: torch.Tensor, chunk: Chunk) -> None:
    """total[rows, :, segments] += part (the gathered layout), in place."""
    rows, at = total[chunk.rows], 0
    for lo, hi in chunk.segments:
        rows[:, :, lo:hi] += part[:, :, at:at + hi - lo]
        at += hi - lo


def _flash_cpu_ops():
    """PyTorch's CPU flash-attention forward (output and log-sum-exp) and backward ops, which SDPA itself runs on CPU
    for these inputs; None where this torch has none (the chunked backward then recomputes each chunk)."""
    ops = torch.ops.aten
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
            ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    return None


FLASH_CPU = _flash_cpu_ops()
FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ChunkedFunction(torch.autograd.Function):
    """Chunked attention with one backward for all chunks, gradients accumulated in place (module doc).

    On CPU the forward runs each chunk through the flash-attention op and keeps its (B', H, C) log-sum-exp, so the
    backward calls the op's backward directly (what SDPA's autograd would do, per chunk); elsewhere the backward
    recomputes each chunk and takes SDPA's gradients."""

    @staticmethod
    def forward(ctx, query, key, value, mask, plan, scaling):
        ctx.mask, ctx.plan, ctx.scaling = mask, plan, scaling
        ctx.flash = FLASH_CPU is not None and query.device.type == "cpu" and query.dtype in FLASH_DTYPES
        if not ctx.flash:
            ctx.save_for_backward(query, key, value)
            return run_plan(query, key, value, mask, plan, scaling)
        out, ctx.lse = query.new_zeros(query.shape), []
        for chunk in plan:
            bias = chunk_bias(mask, chunk, query.dtype)
            o, lse = FLASH_CPU[0](query[chunk.rows, :, chunk.q_lo:chunk.q_hi], gather_keys(key, chunk),
                                  gather_keys(value, chunk), attn_mask=bias, scale=scaling)
            out[chunk.rows, :, chunk.q_lo:chunk.q_hi] = o
            ctx.lse.append(lse)
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing refuses a second unpack
        query, key, value = saved[:3]
        grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for i, chunk in enumerate(ctx.plan):
            rows, span = chunk.rows, slice(chunk.q_lo, chunk.q_hi)
            q, k, v = query[rows, :, span], gather_keys(key, chunk), gather_keys(value, chunk)
            grad = grad_out[rows, :, span]
            if ctx.flash:
                bias = chunk_bias(ctx.mask, chunk, query.dtype)
                dq, dk, dv = FLASH_CPU[1](grad, q, k, v, saved[3][rows, :, span], ctx.lse[i], 0.0, False,
                                          attn_mask=bias, scale=ctx.scaling)
            else:
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                with torch.enable_grad():
                    out = attend(q, k, v, ctx.mask, chunk, ctx.scaling)
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
            grad_q[rows, :, span] += dq
            add_segments_(grad_k, dk, chunk)
            add_segments_(grad_v, dv, chunk)
        return grad_q, grad_k, grad_v, None, None, None


def same_dtype(query, key, value):
    """Under autocast, qk-norm hands attention fp32 queries/keys beside bf16 values; SDPA's autocast rule casts all
    three to the autocast dtype, and so do we (the flash ops below are below autocast and refuse mixed dtypes)."""
    if query.dtype == key.dtype == value.dtype:
        return query, key, value
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


def chunked_attention(query, key, value, mask: AttentionMask, scaling) -> torch.Tensor:
    """Exact attention under `mask`, chunk by chunk: (B, H, Q, D) -> (B, H, Q, D)."""
    if tuple(mask.shape) != (query.shape[0], 1, query.shape[2], key.shape[2]):
        raise RuntimeError(f"attention: mask {tuple(mask.shape)} for queries {tuple(query.shape)} and keys "
                           f"{tuple(key.shape)}")
    query, key, value = same_dtype(query, key, value)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if key.shape[1] != query.shape[1] and query.device.type != "cpu":
        # Masked GQA sends CUDA SDPA to its math kernel (transformers repeats the KV heads for the same reason).
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    plan = chunk_plan(mask)
    if len(plan) == 1 and plan[0] == Chunk(None, 0, query.shape[2], ((0, key.shape[2]),)):
        return attend(query, key, value, mask, plan[0], scaling)  # one chunk (a decoding step): no copies
    if grad:
        return _ChunkedFunction.apply(query, key, value, mask, plan, scaling)
    return run_plan(query, key, value, mask, plan, scaling)
