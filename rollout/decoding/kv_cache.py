"""A preallocated KV cache with a write offset per row, shaped for HF attention layers.

HF attention layers call `cache.update(key, value, layer_idx)` and attend to whatever it returns. This cache
writes the new keys of row r at its own column offset and returns one view `[:, :, :view_len]` of the buffer, so:
- nothing is allocated per step (the buffers are sized once for prompt + response + one fused block);
- rows may be at different blocks (dynamic remasking desynchronises them): each row has its own committed length,
  and the additive attention mask decides which columns of the view a row's queries see. Attention does not care
  about the order of keys (positions are already rotated into them), so a ragged layout is exact;
- "cropping" a noisy block is free: the committed length simply does not advance, the next step overwrites it.
Stale columns beyond a row's committed length are always finite (zeros or old keys), so masking them with a large
negative bias gives them exactly zero weight (0 * NaN would poison the row; zero-initialised buffers avoid that).
"""
from __future__ import annotations

import torch


class RaggedKVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self._offsets: torch.Tensor | None = None
        self._uniform_offset: int | None = None
        self._view_len = 0

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, dtype: torch.dtype, device: torch.device):
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, batch, kv_heads, head_dim, capacity, dtype, device)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def prepare(self, offsets: torch.Tensor, query_len: int, view_len: int | None = None,
                bounds: tuple[int, int] | None = None) -> int:
        """Set where the next forward writes (row r at columns offsets[r] .. +query_len); return the view length.
        `bounds`: (min, max) of offsets when the caller knows them on the host (else read back: a host sync)."""
        low, top = bounds if bounds is not None else (int(offsets.min()), int(offsets.max()))
        view_len = top + query_len if view_len is None else view_len
        if top + query_len > self.capacity or view_len > self.capacity:
            raise RuntimeError(f"kv cache: {top + query_len} columns needed, capacity {self.capacity}")
        self._uniform_offset = low if low == top else None
        self._offsets = offsets.to(self.keys[0].device)
        self._view_len = view_len
        return view_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """HF Cache protocol: store this forward's keys/values, return everything the queries may attend to."""
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
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

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished sequences leave the batch); copies only the columns in use."""
        rows = rows.to(self.keys[0].device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
