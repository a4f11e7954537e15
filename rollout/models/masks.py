"""Block alignment and attention masks: defined once here, used by decoding and training alike.

Layout (block models). Response blocks start at the response's first token: response position i belongs to block
i // B. The prompt is cut into blocks counted *backwards from its end*, so its last block ends exactly where the
response starts and its first block may be short. Why: the layout then depends only on the prompt's own length,
never on how much padding a batch adds, so a prompt decodes identically alone or in any batch; and every
response block is whole, so decoding and the training layout cut the response at the same places.

Block ids: prompt blocks get negative ids (-1 is the block just before the response), response blocks 0, 1, ...
A query sees a key when the key's block is earlier, or the same block (bidirectional inside a block).

The training layout `[prompt | clean response | noisy response]` adds a second copy of the response. A position is
"noisy" when it belongs to that copy: a noisy query sees clean keys of strictly earlier blocks (and the prompt),
and noisy keys only of its own block; clean queries never see noisy keys.

Masks are additive float tensors (0 = attend, dtype-min = blocked) of shape (B, 1, Q, K): transformers honours
custom 4D float masks with sdpa and eager, while a bool mask with eager is silently wrong.
"""
from __future__ import annotations

import torch

# Block id given to padding positions; they are excluded through the key-validity mask, never by id.
PAD_BLOCK = 2**30


def prompt_block_ids(prompt_len: int, block_size: int) -> torch.Tensor:
    """Negative block ids for a prompt, aligned so that the last prompt block ends at the response start."""
    distance_to_end = torch.arange(prompt_len, 0, -1)  # prompt_len .. 1
    return -((distance_to_end + block_size - 1) // block_size)


def response_block_ids(response_len: int, block_size: int, offset: int = 0) -> torch.Tensor:
    """Block ids of response positions offset .. offset+response_len-1."""
    return torch.arange(offset, offset + response_len) // block_size


def attention_bias(
    q_block: torch.Tensor,
    k_block: torch.Tensor,
    k_valid: torch.Tensor,
    *,
    q_noisy: torch.Tensor | None = None,
    k_noisy: torch.Tensor | None = None,
    full: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive mask (B, 1, Q, K) from per-position block ids (B, Q) / (B, K) and key validity (B, K).

    full=True gives bidirectional attention over every valid key (LLaDA/Dream). Queries at padding positions
    still see something (never a fully blocked row), so no NaN can appear; their outputs are ignored.
    """
    valid = k_valid[:, None, :].bool()
    if full:
        allowed = valid.expand(-1, q_block.shape[1], -1)
    else:
        qb = q_block[:, :, None]
        kb = k_block[:, None, :]
        if q_noisy is None:
            allowed = kb <= qb
        else:
            qn = q_noisy[:, :, None].bool()
            kn = k_noisy[:, None, :].bool()
            clean_key_seen = ~kn & ((kb < qb) | ((kb == qb) & ~qn))
            noisy_key_seen = kn & qn & (kb == qb)
            allowed = clean_key_seen | noisy_key_seen
        allowed = allowed & valid
    # A query row with no visible key (a padding query) attends to everything instead of producing NaN.
    empty_row = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty_row
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_block.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def sequence_block_ids(prompt_len: int, response_len: int, block_size: int) -> torch.Tensor:
    """Block ids of `prompt + response` laid out as one sequence (decoding's layout, no padding)."""
    return torch.cat([prompt_block_ids(prompt_len, block_size), response_block_ids(response_len, block_size)])


def sequence_bias(prompt_len: int, response_len: int, block_size: int, *, full: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 1, T, T) mask for one unpadded `prompt + response` sequence."""
    blocks = sequence_block_ids(prompt_len, response_len, block_size)[None]
    valid = torch.ones_like(blocks, dtype=torch.bool)
    return attention_bias(blocks, blocks, valid, full=full, dtype=dtype)
