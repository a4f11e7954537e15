"""A preallocated KV cache of fixed row slots with a write offset per row, shaped for HF attention layers.

HF attention layers call `cache.update(key, value, layer_idx)` and attend to whatever it returns. This cache
writes the new keys of row r at its own column offset and returns one view `[lo:hi, :, :view_len]` of the buffer:
- nothing is allocated per step (the buffers are sized once for `slots` rows of prompt + response + one block);
- rows may be at different blocks (dynamic remasking desynchronises them): each row has its own committed length,
  and the attention mask (per-column block ids and validity: attention.AttentionMask) decides which columns of
  the view a row's queries see. Attention does not care about the order of keys (positions are already rotated
  into them), so a ragged layout is exact;
- "cropping" a noisy block is free: the committed length simply does not advance, the next step overwrites it;
- a forward covers a contiguous range of slots (`prepare(..., rows=(lo, hi))`): the rows decoding together sit in
  slots [0, n), a newly admitted row is prefilled into a free slot >= n by a forward of its own (continuous
  batching), and a finished row's slot is reused: `move_rows` copies a survivor from the end into the hole, in
  place, so rows in use stay a prefix of the slots and no per-layer buffer is ever re-allocated (the old
  `select_rows`, an index_select per layer, briefly held the old and the new cache: up to twice its size).
Stale columns beyond a row's committed length are always finite (zeros, old keys or a previous occupant's keys),
so masking them with a large negative bias gives them exactly zero weight (0 * NaN would poison the row;
zero-initialised buffers avoid that).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of an HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Cache bytes one token of one row takes: layers x kv_heads x head_dim x 2 (keys, values) x dtype size."""
    layers, kv_heads, head_dim = kv_geometry(config)
    return layers * kv_heads * head_dim * 2 * torch.empty((), dtype=dtype).element_size()


@dataclass
class CacheUsage:
    """How full a cache was over the forwards of one generate call: rows in use per forward (peak, mean) and the
    bytes those rows hold (rows x bytes per row), against what was allocated."""

    row_bytes: int = 0  # bytes of one slot (capacity columns x kv_bytes_per_token)
    allocated_bytes: int = 0  # largest cache allocated (slots x row_bytes)
    slots: int = 0  # slots of that cache
    peak_rows: int = 0
    forwards: int = 0
    _row_sum: int = field(default=0, repr=False)

    def allocated(self, slots: int, row_bytes: int) -> None:
        if slots * row_bytes >= self.allocated_bytes:
            self.slots, self.row_bytes, self.allocated_bytes = slots, row_bytes, slots * row_bytes

    def record(self, rows_in_use: int) -> None:
        self.peak_rows = max(self.peak_rows, rows_in_use)
        self.forwards += 1
        self._row_sum += rows_in_use

    @property
    def mean_rows(self) -> float:
        return self._row_sum / self.forwards if self.forwards else 0.0


class RaggedKVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, usage: CacheUsage | None = None):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.usage = usage
        if usage is not None:
            usage.allocated(batch, 2 * num_layers * kv_heads * head_dim * capacity * self.keys[0].element_size())
        self._offsets: torch.Tensor | None = None
        self._uniform_offset: int | None = None
        self._view_len = 0
        self._lo, self._hi = 0, batch

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                  usage: CacheUsage | None = None):
        layers, kv_heads, head_dim = kv_geometry(config)
        return cls(layers, batch, kv_heads, head_dim, capacity, dtype, device, usage)

    @property
    def batch(self) -> int:
        """Row slots (the first dimension of every buffer)."""
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def prepare(self, offsets: torch.Tensor, query_len: int, view_len: int | None = None,
                rows: tuple[int, int] | None = None, bounds: tuple[int, int] | None = None) -> int:
        """Set where the next forward writes (its row i in slot lo + i, at columns offsets[i] .. +query_len; slots
        [lo, hi) = `rows`, default [0, len(offsets))); return the view length. `bounds`: (min, max) of offsets
        when the caller knows them on the host (else read back: a host sync)."""
        lo, hi = rows if rows is not None else (0, offsets.numel())
        if hi - lo != offsets.numel() or lo < 0 or hi > self.batch:
            raise RuntimeError(f"kv cache: rows [{lo}, {hi}) for {offsets.numel()} offsets, {self.batch} slots")
        low, top = bounds if bounds is not None else (int(offsets.min()), int(offsets.max()))
        view_len = top + query_len if view_len is None else view_len
        if top + query_len > self.capacity or view_len > self.capacity:
            raise RuntimeError(f"kv cache: {top + query_len} columns needed, capacity {self.capacity}")
        self._uniform_offset = low if low == top else None
        self._offsets = offsets.to(self.keys[0].device)
        self._view_len = view_len
        self._lo, self._hi = lo, hi
        if self.usage is not None:
            self.usage.record(hi)  # rows in use: slots [0, hi) (rows in use are a prefix of the slots)
        return view_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """HF Cache protocol: store this forward's keys/values, return everything the queries may attend to."""
        k_buf = self.keys[layer_idx][self._lo:self._hi]  # views: a slice of the first dimension
        v_buf = self.values[layer_idx][self._lo:self._hi]
        q = key.shape[2]
        if self._uniform_offset is not None:  # the common case (lock-step rows): a plain slice copy
            start = self._uniform_offset
            k_buf[:, :, start:start + q] = key
            v_buf[:, :, start:start + q] = value
        else:
            cols = self._offsets[:, None] + torch.arange(q, device=key.device)  # (B, Q)
            index = cols[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
            k_buf.scatter_(2, index, key.to(k_buf.dtype))
            v_buf.scatter_(2, index, value.to(v_buf.dtype))
        return k_buf[:, :, :self._view_len], v_buf[:, :, :self._view_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by HF when position ids are missing; diffrl always passes them.
        return self._view_len

    def move_rows(self, moves: list[tuple[int, int]], columns: int | None = None) -> None:
        """Copy slot src into slot dst for each (src, dst), in place (a finished row's slot taken over by a row
        from the end of the prefix in use); only the first `columns` columns (those in use), one row of one layer
        at a time: nothing is allocated. Sources and destinations must be distinct slots."""
        cols = self.capacity if columns is None else columns
        for src, dst in moves:
            for buf in self.keys + self.values:
                buf[dst, :, :cols].copy_(buf[src, :, :cols])


def compaction_moves(keep: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Rows in use are slots [0, n); rows `keep` (ascending) survive. Returns (moves, order): moves (src, dst)
    fill every hole below len(keep) with a survivor from above it, and order[i] is the old slot of the row now in
    slot i. Rows that stay below the cut keep their slot."""
    n, kept = len(keep), set(keep)
    holes = [slot for slot in range(n) if slot not in kept]
    movers = [slot for slot in keep if slot >= n]
    moves = list(zip(movers, holes, strict=True))
    order = list(range(n))
    for src, dst in moves:
        order[dst] = src
    return moves, order
