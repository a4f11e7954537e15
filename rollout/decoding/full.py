"""Full-attention decoding (LLaDA, Dream): semi-autoregressive blocks over a masked canvas.

The canvas is `[prompt | max_tokens masks]` (left-padded to a common width; rows of one call share max_tokens),
every position attends to every valid position, and the response is decoded block by block (blocks of
spec.block_size), each block in its own denoising steps. Rows move through the blocks in lock step: a row that
finishes a block early (dynamic remasking) waits, which never changes its own result (rows do not interact).

KV-cache modes (Fast-dLLM):
- "none": every step recomputes the whole canvas: exact, the reference;
- "prefix": each block's first step recomputes the whole canvas and keeps the KV of everything before the block;
  later steps of the block recompute only the block and the canvas after it;
- "dual": the first step also keeps the KV after the block; later steps recompute only the block.
With full attention a token's KV depends on the whole canvas, so the cached KV goes stale as the block fills in:
both cache modes are approximations, exact only when each block takes a single step.
Dream (`logits_shift`) predicts token i from position i-1, so recomputed windows start one position early.
"""
from __future__ import annotations

from typing import Callable

import torch

from rollout.decoding.kv_cache import CacheUsage, RaggedKVCache
from rollout.decoding.state import BlockView, Row, denoise_rows, forward_at
from rollout.models.attention import AttentionMask

CACHE_MODES = ("none", "prefix", "dual")


def decode_full(policy, rows: list[Row], cache_mode: str = "none",
                on_step: Callable[[int], None] | None = None, usage: CacheUsage | None = None) -> None:
    """Decode `rows` (all with the same max_tokens) to the end of the canvas, in place. Rows finish together (at
    the canvas end), so the cache (prefix/dual) holds exactly len(rows) slots; `usage` records its fill."""
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"kv_cache: unknown full-attention cache mode {cache_mode!r} (expected {CACHE_MODES})")
    lengths = {r.params.max_tokens for r in rows}
    if len(lengths) != 1:
        raise ValueError("decode_full: rows of one call must share max_tokens (the canvas length)")
    spec, device = policy.spec, policy.device
    bs, shift = spec.block_size, int(spec.logits_shift)
    length = lengths.pop()
    width_prompt = max(r.prompt_len for r in rows)
    width = width_prompt + length
    ids = torch.full((len(rows), width), spec.pad_token_id, dtype=torch.long, device=device)
    ids[:, width_prompt:] = spec.mask_token_id  # the whole response starts masked, later blocks included
    pos = torch.zeros_like(ids)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, row in enumerate(rows):
        pad = width_prompt - row.prompt_len
        ids[i, pad:width_prompt] = row.prompt
        if row.prefilled is not None:  # pre-filled tokens are in the canvas from the start, later blocks too
            ids[i, width_prompt:] = row.tokens
        pos[i, pad:] = torch.arange(width - pad, device=device)
        valid[i, pad:] = True
    full_mask = AttentionMask.build(pos, pos, valid, full=True)  # per-position: no (rows, 1, W, W) tensor
    cache = None
    if cache_mode != "none":
        cache = RaggedKVCache.for_model(policy.causal_lm.config, len(rows), width, policy.dtype, device,
                                        usage)
    eos_seen = [False] * len(rows)  # per row: some completed block holds an EOS (read with each step's sync)
    for block in range(length // bs):
        start = width_prompt + block * bs  # canvas column of the block's first token
        window = {"none": (0, width), "prefix": (start - shift, width), "dual": (start - shift, start + bs)}
        first = True
        while True:
            todo = [i for i, r in enumerate(rows) if r.masked_left]  # known on the host (BlockView.read_step)
            if not todo:
                break
            lo, hi = (0, width) if first else window[cache_mode]
            # "none": without a cache rows are independent, so only those still decoding this block are forwarded
            # (batch row k = todo[k]); with a cache every row is (batch row = row).
            batch_row = list(range(len(todo))) if cache_mode == "none" else todo
            view = BlockView([rows[i] for i in todo], extra={"row": todo, "batch_row": batch_row})
            ids[view.col["row"], start:start + bs] = view.gather("tokens")
            if cache_mode == "none":
                sel = view.col["row"]
                batch_ids, batch_pos, bias = ids[sel], pos[sel], full_mask.select_rows(sel)
            else:
                cache.prepare(torch.full((len(rows),), lo, device=device), hi - lo, view_len=width, bounds=(lo, lo))
                batch_ids, batch_pos = ids[:, lo:hi], pos[:, lo:hi]
                bias = full_mask.query_window(lo, hi)
            q_rows = view.col["batch_row"][view.q_row]
            # Column of response position j is width_prompt + j; its logits come from shift columns earlier.
            q_cols = view.idx[view.q_row, view.q_col] + width_prompt - shift - lo
            logits = forward_at(policy, batch_ids, batch_pos, bias, q_rows, q_cols, cache)
            counts, done, has_eos = view.read_step(denoise_rows(view.rows, logits, view))  # the one host sync
            for k, i in enumerate(todo):
                rows[i].nfe += 1
                if done[k] and has_eos[k]:  # a completed block never changes again
                    eos_seen[i] = True
            if on_step is not None:
                on_step(sum(counts))
            first = False
        for i, row in enumerate(rows):
            ids[i, start:start + bs] = row.tokens[row.block_start:row.block_end]
            if row.block + 1 < row.num_blocks:
                row.next_block()
    for i, row in enumerate(rows):
        row.finish_reason = "eos" if eos_seen[i] else "length"
