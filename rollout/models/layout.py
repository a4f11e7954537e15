"""Training layouts and how they are laid into rows: one sample per row (padded) or several per row (packed).

A sample's layout is `[prompt | clean response | noisy canvas]` for block models and `[prompt | noisy response]`
for full-attention ones (rollout/models/masks.py explains the canvas and the mask rule); a block model's layout may
also hold several noisy canvases behind one clean part (`copies_layout`: the trajectory estimator's passes in one
forward). `arrange_rows` lays a batch of layouts into rows:
- padded: row b holds sample b, right-padded to the longest layout;
- packed: first-fit-decreasing into rows of `row_tokens` tokens (default: the longest layout, so no row is longer
  than a padded one and attention never costs more per row), each sample a document of its row: its own document
  id, position ids restarting at 0, attention kept inside it. Packing only removes padding: every sample sees
  exactly the keys and positions it sees alone, so its scores are the same up to floating-point summation order.
The per-position mask inputs come out as an `attention.AttentionMask` (block ids, copy indices, validity, and
document ids for packed rows only: one sample per row needs none, and a remote-code model refuses them), which the
attention kernels run and `.dense_bias()` expands.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.models.attention import AttentionMask
from rollout.models.masks import PAD_BLOCK, block_ids, block_origin
from rollout.models.spec import DiffusionSpec


@dataclass
class SampleLayout:
    """One sample's training layout (n positions, counted from its own start)."""

    ids: torch.Tensor  # (n,) input token ids
    pos: torch.Tensor  # (n,) position ids (from 0)
    block: torch.Tensor  # (n,) block ids (masks.py)
    noisy: torch.Tensor  # (n,) long copy index: 0 clean, c >= 1 position of noisy copy c (masks.py)
    response_pos: torch.Tensor  # (L,) where response token i's own (noisy) input sits; (C, L) per copy
    target_pos: torch.Tensor  # like response_pos: the position whose logits predict token i (spec.logits_shift)

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class RowBatch:
    """Layouts laid into R rows of T positions; sample b is the document starting at `start[b]` of row `row[b]`."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    mask: AttentionMask  # (R, 1, T, T) as per-position mask inputs
    row: torch.Tensor  # (B,) long
    start: torch.Tensor  # (B,) long

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class RowPacking:
    """How a scoring call packs samples into rows (estimators pass it on to `DiffusionPolicy.score_responses`).

    row_tokens None: rows as long as the call's longest layout, the right size under a dense mask, where a row
    costs its width squared whatever documents it holds. The kernels that skip other documents' keys (the chunked
    kernel's document-aware plan, FlexAttention's BlockMask) make longer rows free: a packed row costs the sum of
    its documents, and row_tokens = the learner's pack_tokens gives one row per micro-batch, no padding at all."""

    row_tokens: int | None = None


def score_packing(packing: RowPacking | None) -> dict:
    """score_responses keywords for `packing` (None: one sample per row)."""
    if packing is None:
        return {"packed": False}
    return {"packed": True, "row_tokens": packing.row_tokens}


def alignment_origin(spec: DiffusionSpec, prompt_len: int, alignment: str | None) -> int:
    """Where the first training/decoding block starts: the model's own alignment unless `alignment` overrides it
    (the TraceRL loss's `response` option for an `absolute` model)."""
    if alignment is None:
        return spec.block_origin(prompt_len)
    return block_origin(prompt_len, spec.block_size, alignment)


def layout_length(spec: DiffusionSpec, prompt_len: int, response_len: int, alignment: str | None = None,
                  copies: int = 1) -> int:
    """Positions of one sample's training layout (what `sample_layout`, or `copies_layout` with `copies` noisy
    canvases, builds), without building it."""
    if not spec.is_block:
        return prompt_len + response_len
    head = prompt_len - alignment_origin(spec, prompt_len, alignment)
    return prompt_len + response_len + copies * (response_len + head)


def sample_layout(prompt: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, spec: DiffusionSpec,
                  alignment: str | None = None) -> SampleLayout:
    """One sample's layout with one noisy canvas: `[prompt | clean | noisy]` (block) or `[prompt | noisy]` (full);
    response_pos / target_pos are (L,)."""
    if not spec.is_block:
        prompt, noisy = prompt.long().cpu(), noisy.long().cpu()
        p, length = prompt.numel(), noisy.numel()
        where = torch.arange(p, p + length)
        return SampleLayout(torch.cat([prompt, noisy]), torch.arange(p + length),
                            torch.zeros(p + length, dtype=torch.long), torch.zeros(p + length, dtype=torch.long),
                            where, where - int(spec.logits_shift))
    lay = copies_layout(prompt, clean, [noisy], spec, alignment)
    lay.response_pos, lay.target_pos = lay.response_pos[0], lay.target_pos[0]
    return lay


def copies_layout(prompt: torch.Tensor, clean: torch.Tensor, noisy: list[torch.Tensor], spec: DiffusionSpec,
                  alignment: str | None = None) -> SampleLayout:
    """A block model's layout with C >= 1 noisy canvases sharing one clean part:
    `[prompt | clean response | noisy canvas 1 | ... | noisy canvas C]`, copy c's positions carrying copy index c.
    Each copy has exactly the tokens, position ids and block ids the single-copy layout gives that canvas, and the
    mask (masks.py) lets it see exactly what it would see alone, so every score is the same as C separate
    single-copy forwards (the trajectory estimator's passes) while the prompt and clean response are computed once.
    response_pos / target_pos are (C, L)."""
    if not spec.is_block:
        raise ValueError("copies_layout: several noisy canvases share a clean part only in block models' layout")
    if not noisy:
        raise ValueError("copies_layout: at least one noisy canvas")
    prompt, clean = prompt.long().cpu(), clean.long().cpu()
    p, length = prompt.numel(), clean.numel()
    for canvas in noisy:
        if canvas.numel() != length:
            raise ValueError(f"copies_layout: noisy canvas length {canvas.numel()} != response length {length}")
    # Each noisy copy is the canvas (masks.py): under `absolute` alignment it starts with the prompt's tail,
    # unmasked, because in decoding the tail is computed inside the first block, its hidden states seeing that
    # block's noisy tokens; the prompt's own copy of the tail is the clean one (block 0, clean), which later blocks
    # see, as they see the committed block in decoding.
    origin = alignment_origin(spec, p, alignment)
    head = p - origin
    clean_len, copy_len = p + length, head + length
    clean_blocks = block_ids(0, clean_len, origin, spec.block_size)
    copies = len(noisy)
    starts = clean_len + copy_len * torch.arange(copies)  # where copy c (0-based here) begins
    response_pos = starts[:, None] + head + torch.arange(length)
    # logits_shift: token i is predicted from the input before it. Inside a copy that is the previous canvas
    # position; before a copy's first position (head 0) the single-copy layout reads the position before its noisy
    # copy, the clean response's last token (shared, so the same for every copy here).
    rel = head + torch.arange(length) - int(spec.logits_shift)  # offset from the copy's start
    target_pos = torch.where(rel >= 0, starts[:, None] + rel, clean_len + rel)
    return SampleLayout(
        ids=torch.cat([prompt, clean] + [torch.cat([prompt[origin:], c.long().cpu()]) for c in noisy]),
        pos=torch.cat([torch.arange(clean_len)] + [torch.arange(origin, clean_len)] * copies),
        block=torch.cat([clean_blocks] + [clean_blocks[origin:]] * copies),
        noisy=torch.cat([torch.zeros(clean_len, dtype=torch.long)]
                        + [torch.full((copy_len,), c + 1, dtype=torch.long) for c in range(copies)]),
        response_pos=response_pos,
        target_pos=target_pos,
    )


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity` (an item larger than it gets a bin alone).

    Items in decreasing size (ties: lower index first) go into the first bin with room: deterministic, and
    at most 11/9 OPT + 1 bins."""
    if capacity < 1:
        raise ValueError(f"first_fit_decreasing: capacity must be >= 1, got {capacity}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        for b, load in enumerate(loads):
            if load + sizes[i] <= capacity:
                bins[b].append(i)
                loads[b] += sizes[i]
                break
        else:
            bins.append([i])
            loads.append(sizes[i])
    return bins


def arrange_rows(layouts: list[SampleLayout], *, pad_id: int, full: bool, packed: bool = False,
                 row_tokens: int | None = None) -> RowBatch:
    """Lay sample layouts into rows: one per row (packed=False) or packed first-fit-decreasing into rows of
    max(row_tokens, longest layout) tokens (row_tokens None: the longest layout). Rows are right-padded to the
    fullest one."""
    if not layouts:
        raise ValueError("arrange_rows: no layouts")
    sizes = [len(lay) for lay in layouts]
    if packed:
        capacity = max(sizes) if row_tokens is None else max(int(row_tokens), max(sizes))
        rows = first_fit_decreasing(sizes, capacity)
    else:
        rows = [[b] for b in range(len(layouts))]
    width = max(sum(sizes[b] for b in members) for members in rows)
    num_rows = len(rows)
    input_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    blocks = torch.full((num_rows, width), PAD_BLOCK, dtype=torch.long)
    noisy = torch.zeros((num_rows, width), dtype=torch.long)  # copy indices (0: clean, and padding)
    valid = torch.zeros((num_rows, width), dtype=torch.bool)
    doc = torch.zeros((num_rows, width), dtype=torch.long)
    row_of = torch.zeros(len(layouts), dtype=torch.long)
    start_of = torch.zeros(len(layouts), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for b in members:
            lay, n = layouts[b], sizes[b]
            input_ids[r, at:at + n] = lay.ids
            position_ids[r, at:at + n] = lay.pos
            blocks[r, at:at + n] = lay.block
            noisy[r, at:at + n] = lay.noisy
            valid[r, at:at + n] = True
            doc[r, at:at + n] = b
            row_of[b], start_of[b] = r, at
            at += n
        # Padding (never a valid key) joins the row's last document, so a padding query still sees keys, as it did
        # before documents existed; code that reads key validity off the dense bias keeps working.
        doc[r, at:] = members[-1]
    docs = {"q_doc": doc, "k_doc": doc} if packed else {}
    # q_valid: padding queries' outputs are never read; the chunked kernel skips them.
    mask = AttentionMask.build(blocks, blocks, valid, q_noisy=noisy, k_noisy=noisy, full=full, q_valid=valid, **docs)
    return RowBatch(input_ids, position_ids, mask, row_of, start_of)
