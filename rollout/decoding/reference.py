"""Uncached block decoding: every step recomputes the whole visible sequence from scratch.

The decoder sees `[prompt before its block origin | clean canvas blocks < b | current state of block b]` with the
block-causal mask (the canvas starts at the origin, masks.py), exactly what the cached decoder's KV represents, so
the two must agree token for token. It exists to test the cached decoder
and as the benchmark's baseline; it is never the fast path.
"""
from __future__ import annotations

from typing import Callable

import torch

from rollout.decoding.state import BlockView, Row, denoise_rows, forward_at
from rollout.models.masks import PAD_BLOCK, attention_bias, block_ids


def decode_blocks_uncached(policy, rows: list[Row], on_step: Callable[[int], None] | None = None,
                           max_forwards: int | None = None) -> None:
    """Decode `rows` in place; `max_forwards` stops early (the benchmark times sampled stretches of a decode)."""
    spec = policy.spec
    bs, device = spec.block_size, policy.device
    rows = list(rows)
    forwards = 0
    while rows and (max_forwards is None or forwards < max_forwards):
        forwards += 1
        width = max(r.origin + r.block_end for r in rows)
        ids = torch.full((len(rows), width), spec.pad_token_id, dtype=torch.long, device=device)
        pos = torch.zeros_like(ids)
        block = torch.full_like(ids, PAD_BLOCK)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        view = BlockView(rows)
        q_offset = []
        for i, row in enumerate(rows):
            p, end = row.origin, row.block_end
            start = width - p - end  # left padding
            ids[i, start:start + p] = row.prompt[:p]
            ids[i, start + p:] = row.tokens[:end]  # the canvas: prompt tail (if any), then the response
            pos[i, start:] = torch.arange(p + end, device=device)
            block[i, start:] = block_ids(0, p + end, p, bs).to(device)
            valid[i, start:] = True
            q_offset.append(start + p + row.block_start)
        bias = attention_bias(block, block, valid)
        q_cols = view.q_col + torch.tensor(q_offset, device=device)[view.q_row]
        logits = forward_at(policy, ids, pos, bias, view.q_row, q_cols)
        unmasked = denoise_rows(rows, logits, view)
        done, has_eos = view.status()
        for i, row in enumerate(rows):
            row.nfe += 1
            if done[i] and not row.finish_if_done(has_eos[i]):
                row.next_block()
        if on_step is not None:
            on_step(unmasked)
        rows = [r for r in rows if r.finish_reason is None]
