"""Cached block-diffusion decoding (TraDo/SDAR and any block-causal policy).

One forward per denoising step, over only the tokens that change:
- the first forward is the prompt (left-padded; positions and prompt blocks from its own length, so padding never
  changes its layout) fused with the first denoising step of block 0;
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
from rollout.decoding.state import Row, denoise_rows, forward_at
from rollout.models.masks import PAD_BLOCK, attention_bias, prompt_block_ids


class _Batch:
    """Query slots of one forward: ids, positions, block ids, validity, and where each row's noisy block sits."""

    def __init__(self, size: int, width: int, pad_id: int, device: torch.device):
        self.ids = torch.full((size, width), pad_id, dtype=torch.long, device=device)
        self.pos = torch.zeros((size, width), dtype=torch.long, device=device)
        self.block = torch.full((size, width), PAD_BLOCK, dtype=torch.long, device=device)
        self.valid = torch.zeros((size, width), dtype=torch.bool, device=device)
        self.commit = [0] * size  # leading slots whose KV is kept (clean tokens)
        self.noisy_at = [0] * size  # slot of the current block's first position

    def put(self, i: int, start: int, ids: torch.Tensor, pos: torch.Tensor, block) -> None:
        end = start + ids.numel()
        self.ids[i, start:end] = ids
        self.pos[i, start:end] = pos
        self.block[i, start:end] = block
        self.valid[i, start:end] = True


def decode_blocks_cached(policy, rows: list[Row], on_step: Callable[[int], None] | None = None) -> None:
    """Decode `rows` to completion in place (each row ends with a finish_reason)."""
    spec = policy.spec
    bs, device = spec.block_size, policy.device
    width_prompt = max(r.prompt_len for r in rows)
    capacity = width_prompt + max(r.params.max_tokens for r in rows) + bs
    cache = RaggedKVCache.for_model(policy.causal_lm.config, len(rows), capacity, policy.dtype, device)
    key_block = torch.full((len(rows), capacity), PAD_BLOCK, dtype=torch.long, device=device)
    key_valid = torch.zeros((len(rows), capacity), dtype=torch.bool, device=device)
    cache_len = [0] * len(rows)
    pending = [False] * len(rows)  # row's previous block is complete but its clean KV is not in the cache yet
    first = True
    while rows:
        if first:
            batch = _prefill_slots(rows, width_prompt, spec, device)
        else:
            batch = _step_slots(rows, pending, spec, device)
        width = batch.ids.shape[1]
        offsets = torch.tensor(cache_len, device=device)
        view = cache.prepare(offsets, width)
        # Keys this forward sees: the committed columns plus its own slots written at each row's offset.
        cols = offsets[:, None] + torch.arange(width, device=device)
        k_block = key_block[:, :view].clone().scatter_(1, cols, batch.block)
        k_valid = key_valid[:, :view].clone().scatter_(1, cols, batch.valid)
        bias = attention_bias(batch.block, k_block, k_valid)
        masked = [r.block_masked() for r in rows]
        q_rows = torch.cat([torch.full_like(m, i) for i, m in enumerate(masked)])
        q_cols = torch.cat([m - r.block_start + batch.noisy_at[i] for i, (r, m) in enumerate(zip(rows, masked))])
        logits = forward_at(policy, batch.ids, batch.pos, bias, q_rows, q_cols, cache)
        for i, c in enumerate(batch.commit):
            if c:
                start = cache_len[i]
                key_block[i, start:start + c] = batch.block[i, :c]
                key_valid[i, start:start + c] = batch.valid[i, :c]
                cache_len[i] = start + c
        first = False
        unmasked = denoise_rows(rows, logits, masked)
        for i, row in enumerate(rows):
            row.nfe += 1
            pending[i] = False
            if row.block_done and not row.finish_if_done():
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


def _prefill_slots(rows: list[Row], width_prompt: int, spec, device) -> _Batch:
    """[left-padded prompt | block 0]: the prompt's KV is committed by the first denoising step."""
    bs = spec.block_size
    batch = _Batch(len(rows), width_prompt + bs, spec.pad_token_id, device)
    for i, row in enumerate(rows):
        p = row.prompt_len
        batch.put(i, width_prompt - p, row.prompt, torch.arange(p, device=device),
                  prompt_block_ids(p, bs).to(device))
        batch.put(i, width_prompt, row.tokens[:bs], p + torch.arange(bs, device=device), 0)
        batch.commit[i] = width_prompt
        batch.noisy_at[i] = width_prompt
    return batch


def _step_slots(rows: list[Row], pending: list[bool], spec, device) -> _Batch:
    """[clean block b-1 | noisy block b] for rows with a pending commit, [noisy block b | pad] for the others."""
    bs = spec.block_size
    batch = _Batch(len(rows), bs * (2 if any(pending) else 1), spec.pad_token_id, device)
    offsets = torch.arange(bs, device=device)
    for i, row in enumerate(rows):
        start, p = row.block_start, row.prompt_len
        slot = 0
        if pending[i]:
            batch.put(i, 0, row.tokens[start - bs:start], p + start - bs + offsets, row.block - 1)
            batch.commit[i] = bs
            slot = bs
        batch.put(i, slot, row.tokens[start:start + bs], p + start + offsets, row.block)
        batch.noisy_at[i] = slot
    return batch
