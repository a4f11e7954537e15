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
(schedules, slots, lengths) travel in one buffer per step. `sync_counter.count_host_syncs()` counts both.
"""
from __future__ import annotations

from typing import Callable

from rollout.decoding import sync_counter
from rollout.decoding.state import Row


def decode(policy, rows: list[Row], kv_cache: str, on_step: Callable[[int], None] | None = None) -> None:
    """Decode `rows` in place with the decoder for the policy's attention layout and `kv_cache` mode."""
    with sync_counter.counting():  # a no-op unless a test or benchmark counts host syncs
        return _decode(policy, rows, kv_cache, on_step)


def _decode(policy, rows: list[Row], kv_cache: str, on_step: Callable[[int], None] | None) -> None:
    if policy.spec.is_block:
        if policy.spec.logits_shift:
            raise ValueError("model.logits_shift: block decoding of shifted-logit models is not supported")
        if kv_cache == "block":
            from rollout.decoding.block import decode_blocks_cached

            return decode_blocks_cached(policy, rows, on_step)
        if kv_cache == "none":
            from rollout.decoding.reference import decode_blocks_uncached

            return decode_blocks_uncached(policy, rows, on_step)
        raise ValueError(f"kv_cache: {kv_cache!r} does not apply to block-causal models (block or none)")
    from rollout.decoding.full import decode_full

    return decode_full(policy, rows, kv_cache, on_step)


__all__ = ["decode", "Row"]
