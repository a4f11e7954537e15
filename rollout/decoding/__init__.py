"""Decoders: turn rows of requests into decoded canvases (see state.Row), by attention layout and cache mode.

| layout        | kv_cache | module       | what                                                            |
|---------------|----------|--------------|-----------------------------------------------------------------|
| block-causal  | block    | block.py     | cached block diffusion, commit fused into the next block's step |
| block-causal  | none     | reference.py | full recompute every step (tests, benchmark baseline)           |
| full          | none     | full.py      | semi-autoregressive blocks over a masked canvas, exact          |
| full          | prefix   | full.py      | Fast-dLLM prefix cache, refreshed once per block                |
| full          | dual     | full.py      | Fast-dLLM dual cache                                            |

Every decoder keeps the canvas, masks, remasking choices and draws on the device and makes one host sync per
step (state.BlockView.read_step: tokens unmasked, block done, EOS, per row); per-row values the host knows
(schedules, slots, lengths) travel in one buffer per step. `sync_counter.count_host_syncs()` counts both. Under
a memory budget (`slots`), cached block decoding admits waiting rows into finished rows' slots by a prefill forward
of their own and evicts in place; both work from what read_step already returned, so that stays one sync per step.
"""
from __future__ import annotations

from typing import Callable

from rollout.decoding import sync_counter
from rollout.decoding.state import Row


def decode(policy, rows: list[Row], kv_cache: str, on_step: Callable[[int], None] | None = None, *,
           slots: int | None = None, usage=None) -> None:
    """Decode `rows` in place with the decoder for the policy's attention layout and `kv_cache` mode.
    `slots`: rows decoding at once (continuous batching, cached block decoding only; the other decoders take the
    rows as one batch); `usage`: a kv_cache.CacheUsage recording how full the KV cache was."""
    with sync_counter.counting():  # a no-op unless a test or benchmark counts host syncs
        return _decode(policy, rows, kv_cache, on_step, slots, usage)


def _decode(policy, rows: list[Row], kv_cache: str, on_step: Callable[[int], None] | None, slots: int | None,
            usage) -> None:
    if policy.spec.is_block:
        if policy.spec.logits_shift:
            raise ValueError("model.logits_shift: block decoding of shifted-logit models is not supported")
        if kv_cache == "block":
            from rollout.decoding.block import decode_blocks_cached

            return decode_blocks_cached(policy, rows, on_step, slots=slots, usage=usage)
        if kv_cache == "none":
            from rollout.decoding.reference import decode_blocks_uncached

            _one_batch(rows, slots)
            return decode_blocks_uncached(policy, rows, on_step)
        raise ValueError(f"kv_cache: {kv_cache!r} does not apply to block-causal models (block or none)")
    from rollout.decoding.full import decode_full

    _one_batch(rows, slots)
    return decode_full(policy, rows, kv_cache, on_step, usage=usage)


def cache_columns(spec, rows: list[Row]) -> int:
    """Columns of one row's KV cache slot when `rows` decode in one call: block-causal, the longest prompt before
    its block origin + the longest canvas + one fused block (block.py); full attention, longest prompt + canvas."""
    if not rows:
        return 0
    canvas = max(r.params.max_tokens for r in rows)
    if spec.is_block:
        return max(r.origin for r in rows) + canvas + spec.block_size
    return max(r.prompt_len for r in rows) + canvas


def _one_batch(rows: list[Row], slots: int | None) -> None:
    if slots is not None and slots < len(rows):
        raise ValueError(f"decode: {len(rows)} rows for {slots} slots; only cached block decoding admits rows "
                         "as others finish (the engine batches the other decoders)")


__all__ = ["decode", "cache_columns", "Row"]
