"""Cached block-diffusion decoding (TraDo/SDAR and any block-causal policy).

One forward per denoising step, over only the tokens that change:
- the first forward is the prompt up to its block origin (left-padded; positions and blocks from its own length,
  so padding never changes its layout) fused with the first denoising step of block 0. Under `absolute` alignment
  block 0 holds the prompt's tail (P mod B tokens, never masked) and the response's head: the tail is recomputed
  with the block at every step and committed with it, as SDAR's generate and TraDo's engine do;
- every later forward is the current block's noisy state, preceded, when a block has just been completed, by that
  block's clean tokens: committing block b (writing its clean KV) is fused into block b+1's first step. The clean
  tokens are written to the cache in place and kept; the noisy block's KV lands after them and is overwritten by
  the next step (a "crop" that costs nothing);
- rows advance independently (dynamic remasking finishes blocks at different steps): the cache keeps one committed
  length per row and the mask (per-column block ids and validity, attention.AttentionMask) says which columns each
  row sees (see kv_cache.py). When some row needs a commit and
  others do not, the others' query slots are padded;
- a request that stops (EOS block or budget) leaves the batch at once, so no compute is spent on it, and its
  cache slot goes to the next waiting request (continuous batching: `slots` rows decode at once, the cache holds
  exactly that many; a newcomer's prompt is prefilled into its slot by a forward of its own while the others
  wait mid-decoding, and rows never interact, so a request's tokens do not depend on who shares its batch).
Logits are computed only at each row's still-masked positions.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from rollout.decoding import cache_columns
from rollout.decoding.kv_cache import CacheUsage, RaggedKVCache, compaction_moves
from rollout.decoding.state import BlockView, Row, denoise_rows, forward_at, share_state
from rollout.models.attention import AttentionMask
from rollout.models.masks import PAD_BLOCK


def decode_blocks_cached(policy, rows: list[Row], on_step: Callable[[int], None] | None = None,
                         slots: int | None = None, usage: CacheUsage | None = None) -> None:
    """Decode `rows` in place (each row ends with a finish_reason). `slots`: rows decoding at once, the cache's
    row slots (default: all rows). The others wait, in order, and are admitted as rows finish: a forward of their
    own prefills them into the free slots (their first denoising step), then they decode with the rest.
    `usage` records how full the cache was (kv_cache.CacheUsage).

    Host syncs: one per forward (BlockView.read_step). Admission and eviction read nothing from the device: which
    rows finished is known from the previous step's read_step, and slots, offsets and moves are host bookkeeping."""
    spec, device = policy.spec, policy.device
    share_state(rows)
    # One layout for every row, whatever its batch: prompts left-padded to the longest origin of the call.
    width_prompt = max(r.origin for r in rows)
    capacity = cache_columns(spec, rows)  # width_prompt + longest canvas + one block
    slots = len(rows) if slots is None else min(slots, len(rows))
    if slots < 1:
        raise ValueError(f"decode_blocks_cached: slots must be >= 1, got {slots}")
    cache = RaggedKVCache.for_model(policy.causal_lm.config, slots, capacity, policy.dtype, device, usage)
    block_buf = torch.full((slots, capacity), PAD_BLOCK, dtype=torch.long, device=device)
    valid_buf = torch.zeros((slots, capacity), dtype=torch.bool, device=device)
    waiting = deque(rows)
    rows, cache_len, pending = [], [], []  # rows in slots [0, len(rows)); pending: clean KV of the last block due
    while rows or waiting:
        admitting = bool(waiting) and len(rows) < slots
        if admitting:  # prefill waiting rows into the free slots (their first step; the others wait)
            lo, fwd = len(rows), _admit(waiting, slots - len(rows), block_buf, valid_buf, len(rows))
            rows, cache_len, pending = rows + fwd, cache_len + [0] * len(fwd), pending + [False] * len(fwd)
        else:
            lo, fwd = 0, rows
        hi = lo + len(fwd)
        offs = cache_len[lo:hi]
        # Per-row values the host knows reach the device with the view's one copy (no list -> tensor per use).
        view = BlockView(fwd, extra={"origin": [r.origin for r in fwd], "block": [r.block for r in fwd],
                                     "offset": offs, "pending": [int(p) for p in pending[lo:hi]]})
        if admitting:
            batch = _prefill_slots(fwd, view, width_prompt, spec, device)
        else:
            batch = _step_slots(fwd, view, pending[lo:hi], spec, device)
        key_block, key_valid = block_buf[lo:hi], valid_buf[lo:hi]  # views: commits below write the buffers
        width = batch.ids.shape[1]
        offsets = view.col["offset"]
        view_len = cache.prepare(offsets, width, rows=(lo, hi), bounds=(min(offs), max(offs)))
        # Keys this forward sees: the committed columns plus its own slots written at each row's offset.
        cols = offsets[:, None] + torch.arange(width, device=device)
        k_block = key_block[:, :view_len].clone().scatter_(1, cols, batch.block)
        k_valid = key_valid[:, :view_len].clone().scatter_(1, cols, batch.valid)
        bias = AttentionMask.build(batch.block, k_block, k_valid)  # O(view) state; the policy's kernel runs it
        q_cols = view.q_col if batch.noisy_at is None else view.q_col + batch.noisy_at[view.q_row]
        logits = forward_at(policy, batch.ids, batch.pos, bias, view.q_row, q_cols, cache)
        if any(batch.commit):
            # The leading `commit` slots of a row stay in the cache: their key columns become permanent.
            commit = batch.commit_t
            kept = torch.zeros_like(k_valid).scatter_(1, cols, torch.arange(width, device=device) < commit[:, None])
            key_block[:, :view_len] = torch.where(kept, k_block, key_block[:, :view_len])
            key_valid[:, :view_len] = torch.where(kept, k_valid, key_valid[:, :view_len])
            cache_len[lo:hi] = [n + c for n, c in zip(offs, batch.commit)]
        counts, done, has_eos = view.read_step(denoise_rows(fwd, logits, view))  # the step's one host sync
        unmasked = sum(counts)
        for i, row in enumerate(fwd):
            row.nfe += 1
            pending[lo + i] = False
            if done[i] and not row.finish_if_done(has_eos[i]):
                row.next_block()
                pending[lo + i] = True
        if on_step is not None:
            on_step(unmasked)
        rows, cache_len, pending = _evict(rows, cache_len, pending, cache, block_buf, valid_buf)


def _admit(waiting: deque, free: int, block_buf: torch.Tensor, valid_buf: torch.Tensor, lo: int) -> list[Row]:
    """Take up to `free` waiting rows for slots lo, lo+1, ...; forget those slots' previous keys (their stale KV
    stays in the cache, finite and masked out)."""
    new = [waiting.popleft() for _ in range(min(free, len(waiting)))]
    block_buf[lo:lo + len(new)] = PAD_BLOCK
    valid_buf[lo:lo + len(new)] = False
    return new


def _evict(rows: list[Row], cache_len: list[int], pending: list[bool], cache: RaggedKVCache,
           block_buf: torch.Tensor, valid_buf: torch.Tensor) -> tuple[list[Row], list[int], list[bool]]:
    """Finished rows leave at once: survivors from the end of the slots in use move into their slots, in place
    (the columns in use only, one row of one layer at a time), so rows in use stay slots [0, n)."""
    keep = [i for i, r in enumerate(rows) if r.finish_reason is None]
    if len(keep) == len(rows):
        return rows, cache_len, pending
    moves, order = compaction_moves(keep)
    if moves:
        columns = max(cache_len[src] for src, _ in moves)
        cache.move_rows(moves, columns)
        for src, dst in moves:
            block_buf[dst].copy_(block_buf[src])
            valid_buf[dst].copy_(valid_buf[src])
    return [rows[i] for i in order], [cache_len[i] for i in order], [pending[i] for i in order]


class _Batch:
    """Query slots of one forward: ids, positions, block ids, validity (R, width); `commit` (per row) leading
    slots whose KV is kept (clean tokens); `noisy_at` (R,) slot of the current block's first position (None: 0)."""

    def __init__(self, ids, pos, block, valid, commit: list[int], commit_t: torch.Tensor | None,
                 noisy_at: torch.Tensor | None):
        self.ids, self.pos, self.block, self.valid = ids, pos, block, valid
        self.commit, self.commit_t, self.noisy_at = commit, commit_t, noisy_at  # commit_t: (R,) on the device


def _prefill_slots(rows: list[Row], view: BlockView, width_prompt: int, spec, device) -> _Batch:
    """[left-padded prompt before its block origin | block 0]: that prefix's KV is committed by the first
    denoising step. Built for all rows at once: a prompt's layout depends only on its own length (positions count
    from its first token, block ids from its origin), so every column's position and block id is a function of
    (column, origin)."""
    bs, size, width = spec.block_size, len(rows), width_prompt + spec.block_size
    lengths = view.col["origin"]
    first = width_prompt - lengths  # column of each prompt's first token
    col = torch.arange(width, device=device)
    valid = col[None, :] >= first[:, None]
    pos = (col[None, :] - first[:, None]).clamp(min=0)
    block = torch.where(col < width_prompt, -((width_prompt - col + bs - 1) // bs), 0)
    block = torch.where(valid, block[None, :], PAD_BLOCK)
    ids = torch.full((size, width), spec.pad_token_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # once per admission; slices at host-known lengths (no boolean-mask write)
        ids[i, width_prompt - row.origin:width_prompt] = row.prompt[:row.origin]
    ids[:, width_prompt:] = view.shared.tokens[view.slots, :bs]  # every row's first canvas block
    full = torch.full((size,), width_prompt, dtype=torch.long, device=device)
    return _Batch(ids, pos, block, valid, [width_prompt] * size, full, full)


def _step_slots(rows: list[Row], view: BlockView, pending: list[bool], spec, device) -> _Batch:
    """[clean block b-1 | noisy block b] for rows with a pending commit, [noisy block b | pad] for the others;
    built for all rows at once from the shared canvas."""
    bs = spec.block_size
    noisy = view.gather("tokens")
    pos = view.col["origin"][:, None] + view.idx
    block = view.col["block"][:, None].expand(-1, bs)
    if not any(pending):
        return _Batch(noisy, pos, block, torch.ones_like(noisy, dtype=torch.bool), [0] * len(rows), None, None)
    pend = view.col["pending"].bool()[:, None]
    clean = view.shared.tokens[view.slots[:, None], (view.idx - bs).clamp(min=0)]
    pad = torch.full_like(noisy, spec.pad_token_id)
    ids = torch.cat([torch.where(pend, clean, noisy), torch.where(pend, noisy, pad)], dim=1)
    pos = torch.cat([torch.where(pend, pos - bs, pos), torch.where(pend, pos, 0)], dim=1)
    block = torch.cat([torch.where(pend, block - 1, block), torch.where(pend, block, PAD_BLOCK)], dim=1)
    valid = torch.cat([torch.ones_like(pend).expand(-1, bs), pend.expand(-1, bs)], dim=1)
    commit = [bs if p else 0 for p in pending]
    commit_t = pend[:, 0].long() * bs
    return _Batch(ids, pos, block, valid, commit, commit_t, commit_t)
