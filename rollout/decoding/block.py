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
  length per row and the mask says which columns each row sees (see kv_cache.py). When some row needs a commit and
  others do not, the others' query slots are padded;
- a request that stops (EOS block or budget) leaves the batch at once, so no compute is spent on it.
Logits are computed only at each row's still-masked positions.
"""
from __future__ import annotations

from typing import Callable

import torch

from rollout.decoding.kv_cache import RaggedKVCache
from rollout.decoding.state import BlockView, Row, denoise_rows, forward_at, share_state
from rollout.models.masks import PAD_BLOCK, attention_bias


def decode_blocks_cached(policy, rows: list[Row], on_step: Callable[[int], None] | None = None) -> None:
    """Decode `rows` in place (each row ends with a finish_reason)."""
    spec = policy.spec
    bs, device = spec.block_size, policy.device
    share_state(rows)
    width_prompt = max(r.origin for r in rows)
    capacity = width_prompt + max(r.params.max_tokens for r in rows) + bs
    cache = RaggedKVCache.for_model(policy.causal_lm.config, len(rows), capacity, policy.dtype, device)
    key_block = torch.full((len(rows), capacity), PAD_BLOCK, dtype=torch.long, device=device)
    key_valid = torch.zeros((len(rows), capacity), dtype=torch.bool, device=device)
    cache_len = [0] * len(rows)
    pending = [False] * len(rows)  # row's previous block is complete but its clean KV is not in the cache yet
    first = True
    while rows:
        # Per-row values the host knows reach the device with the view's one copy (no list -> tensor per use).
        view = BlockView(rows, extra={"origin": [r.origin for r in rows], "block": [r.block for r in rows],
                                      "offset": cache_len, "pending": [int(p) for p in pending]})
        if first:
            batch = _prefill_slots(rows, view, width_prompt, spec, device)
        else:
            batch = _step_slots(rows, view, pending, spec, device)
        width = batch.ids.shape[1]
        offsets = view.col["offset"]
        view_len = cache.prepare(offsets, width, bounds=(min(cache_len), max(cache_len)))
        # Keys this forward sees: the committed columns plus its own slots written at each row's offset.
        cols = offsets[:, None] + torch.arange(width, device=device)
        k_block = key_block[:, :view_len].clone().scatter_(1, cols, batch.block)
        k_valid = key_valid[:, :view_len].clone().scatter_(1, cols, batch.valid)
        bias = attention_bias(batch.block, k_block, k_valid)
        q_cols = view.q_col if batch.noisy_at is None else view.q_col + batch.noisy_at[view.q_row]
        logits = forward_at(policy, batch.ids, batch.pos, bias, view.q_row, q_cols, cache)
        if any(batch.commit):
            # The leading `commit` slots of a row stay in the cache: their key columns become permanent.
            commit = batch.commit_t
            kept = torch.zeros_like(k_valid).scatter_(1, cols, torch.arange(width, device=device) < commit[:, None])
            key_block[:, :view_len] = torch.where(kept, k_block, key_block[:, :view_len])
            key_valid[:, :view_len] = torch.where(kept, k_valid, key_valid[:, :view_len])
            cache_len = [n + c for n, c in zip(cache_len, batch.commit)]
        first = False
        counts, done, has_eos = view.read_step(denoise_rows(rows, logits, view))  # the step's one host sync
        unmasked = sum(counts)
        for i, row in enumerate(rows):
            row.nfe += 1
            pending[i] = False
            if done[i] and not row.finish_if_done(has_eos[i]):
                row.next_block()
                pending[i] = True
        if on_step is not None:
            on_step(unmasked)
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None]
        if len(keep) < len(rows):
            if keep:
                index = torch.tensor(keep, device=device)
                cache.select_rows(index)
                key_block, key_valid = key_block[index], key_valid[index]
            rows = [rows[i] for i in keep]
            cache_len = [cache_len[i] for i in keep]
            pending = [pending[i] for i in keep]


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
    for i, row in enumerate(rows):  # once per decode; slices at host-known lengths (no boolean-mask write)
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
