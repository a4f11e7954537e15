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
from rollout.models.attention import AttentionMask
from rollout.models.masks import PAD_BLOCK


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
        view = BlockView(rows, extra={"origin": [r.origin for r in rows], "end": [r.block_end for r in rows]})
        origin = view.col["origin"][:, None]
        start = width - origin - view.col["end"][:, None]  # (R, 1) left padding
        rel = torch.arange(width, device=device)[None, :] - start  # position of each column in its row
        valid = rel >= 0
        pos = rel.clamp(min=0)
        block = torch.where(valid, torch.div(rel - origin, bs, rounding_mode="floor"), PAD_BLOCK)  # block_ids
        ids = torch.full((len(rows), width), spec.pad_token_id, dtype=torch.long, device=device)
        for i, row in enumerate(rows):  # slices at host-known lengths: device copies, nothing read back
            p, end = row.origin, row.block_end
            ids[i, width - p - end:width - end] = row.prompt[:p]
            ids[i, width - end:] = row.tokens[:end]  # the canvas: prompt tail (if any), then the response
        bias = AttentionMask.build(block, block, valid)
        q_cols = view.q_col + (start[:, 0] + view.col["origin"] + view.starts)[view.q_row]
        logits = forward_at(policy, ids, pos, bias, view.q_row, q_cols)
        counts, done, has_eos = view.read_step(denoise_rows(rows, logits, view))  # the step's one host sync
        for i, row in enumerate(rows):
            row.nfe += 1
            if done[i] and not row.finish_if_done(has_eos[i]):
                row.next_block()
        if on_step is not None:
            on_step(sum(counts))
        rows = [r for r in rows if r.finish_reason is None]
