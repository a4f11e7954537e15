"""IGPO's inpainting (arXiv 2509.10396; facebookresearch/igpo): which groups get hints, which trace tokens, where.

When every response of a group is wrong the group carries no gradient (zero advantage). IGPO then regenerates the
group's samples with part of a reference reasoning trace pre-filled in the canvas (rollout: GenerationRequest.
prefill, never sampled nor remasked), and swaps up to `max_replacements` of the correct regenerations into the
group (its first samples), so the group has a spread of rewards again. Pre-filled tokens are hints, not the
policy's choices: the learner never counts them (rl.estimators.base.token_mask_of).

The hint of one sample, as the reference code builds it (utils/generate.py create_spacing_scaled_inpainting_
sequence, with its defaults of the released run):
- the trace (its first E tokens, E = canvas length - `free_tail`, the last 30 positions always left to the model)
  is cut into consecutive chunks of U{min_chunk..max_chunk} tokens (5..10); a last piece shorter than min_chunk is
  dropped;
- the sample's inpainting ratio eta ~ U[ratio_low, ratio_high] (0.2, 0.6; drawn per sample, sorted ascending in
  the group) reveals the chunks left after hiding int(#chunks * (1 - eta)) of them chosen at random; the last chunk
  is always revealed;
- revealed chunks are placed with their spacing stretched by s = min(1.5, max(1, E / trace length)): the first at
  int(start * s), each next one after the previous placed chunk's end plus min(int(gap * s), max_spacing); a chunk
  reaching past E is cut there, and none starts at or after E.
Randomness comes from a torch.Generator per sample (the reference seeds Python's `random`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TRIGGERS = ("all_wrong", "zero_advantage")


@dataclass(frozen=True)
class InpaintConfig:
    ratio_low: float = 0.2  # eta ~ U[low, high] per sample (run_igpo.sh: inpaint_chunk_ratio_low 0.2,
    ratio_high: float = 0.6  # inpaint_chunk_high_initial_ratio 0.6)
    min_chunk: int = 5  # run_igpo.sh --min_chunk_size 5 --max_chunk_size 10
    max_chunk: int = 10
    max_spacing: int = 100  # diffu_grpo_config.py max_spacing
    free_tail: int = 30  # last canvas positions never pre-filled (create_spacing_scaled_inpainting_sequence)
    max_replacements: int = 4  # run_igpo.sh max_replacement=4
    trigger: str = "all_wrong"  # the reference: every response wrong; "zero_advantage": all rewards equal

    def __post_init__(self) -> None:
        if not 0 <= self.ratio_low <= self.ratio_high <= 1:
            raise ValueError(f"inpaint: need 0 <= ratio_low <= ratio_high <= 1, got {self.ratio_low}, "
                             f"{self.ratio_high}")
        if not 1 <= self.min_chunk <= self.max_chunk:
            raise ValueError(f"inpaint: need 1 <= min_chunk <= max_chunk, got {self.min_chunk}, {self.max_chunk}")
        if self.max_spacing < 0 or self.free_tail < 0 or self.max_replacements < 1:
            raise ValueError("inpaint: max_spacing and free_tail must be >= 0, max_replacements >= 1")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"inpaint.trigger: {self.trigger!r} not in {TRIGGERS}")


def groups_to_inpaint(rewards: list[float], correct: list[bool], group_ids: list[int], trigger: str) -> list[int]:
    """The groups (ids in order of first appearance) that get hints: every response wrong ("all_wrong") or every
    reward equal ("zero_advantage")."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    out = []
    for g, idx in members.items():
        if trigger == "all_wrong":
            hit = not any(correct[i] for i in idx)
        elif trigger == "zero_advantage":
            hit = len({rewards[i] for i in idx}) == 1
        else:
            raise ValueError(f"inpaint.trigger: {trigger!r} not in {TRIGGERS}")
        if hit:
            out.append(g)
    return out


def inpaint_ratios(n: int, cfg: InpaintConfig, generator: torch.Generator) -> list[float]:
    """One eta per sample of a group, U[ratio_low, ratio_high], sorted ascending (the reference sorts them)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return sorted((cfg.ratio_low + u * (cfg.ratio_high - cfg.ratio_low)).tolist())


def trace_chunks(length: int, cfg: InpaintConfig, generator: torch.Generator) -> list[tuple[int, int]]:
    """Consecutive [start, end) chunks of U{min_chunk..max_chunk} tokens over `length`; a short last piece
    (< min_chunk) is dropped."""
    chunks, i = [], 0
    while i < length:
        size = int(torch.randint(cfg.min_chunk, cfg.max_chunk + 1, (1,), generator=generator))
        size = min(size, length - i)
        if size < cfg.min_chunk:
            break
        chunks.append((i, i + size))
        i += size
    return chunks


def revealed_chunks(chunks: list[tuple[int, int]], ratio: float,
                    generator: torch.Generator) -> list[tuple[int, int]]:
    """Hide int(#chunks * (1 - ratio)) chunks chosen uniformly at random; reveal the rest and always the last."""
    hidden_count = int(len(chunks) * (1 - ratio))
    hidden = set(torch.randperm(len(chunks), generator=generator)[:hidden_count].tolist()) if chunks else set()
    return [c for k, c in enumerate(chunks) if k not in hidden or k == len(chunks) - 1]


def place_chunks(chunks: list[tuple[int, int]], scale: float, limit: int,
                 max_spacing: int) -> list[tuple[int, int]]:
    """Canvas [start, end) of each revealed chunk: spacing stretched by `scale` (capped at max_spacing), cut at
    `limit`; chunks that would start at or after `limit` are left out (with everything after them)."""
    placed: list[tuple[int, int]] = []
    for k, (start, end) in enumerate(chunks):
        if k == 0:
            at = int(start * scale)
        else:
            at = placed[-1][1] + min(int((start - chunks[k - 1][1]) * scale), max_spacing)
        stop = at + (end - start)
        if stop > limit:
            if at >= limit:
                break
            stop = limit
        placed.append((at, stop))
    return placed


def inpaint_canvas(trace: list[int], canvas: int, ratio: float, cfg: InpaintConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """(canvas,) long: the hint of one sample (trace token ids where pre-filled, -1 where the model samples)."""
    out = torch.full((canvas,), -1, dtype=torch.long)
    effective = max(0, canvas - cfg.free_tail)
    if not trace or effective == 0:
        return out
    scale = min(1.5, max(1.0, effective / len(trace)))
    used = trace[:effective]
    shown = revealed_chunks(trace_chunks(len(used), cfg, generator), ratio, generator)
    for (start, end), (at, stop) in zip(shown, place_chunks(shown, scale, effective, cfg.max_spacing)):
        out[at:stop] = torch.tensor(used[start:start + (stop - at)], dtype=torch.long)
    return out


def replacements(correct_hinted: list[bool], max_replacements: int,
                 generator: torch.Generator) -> list[tuple[int, int]]:
    """(group position replaced, hinted sample replacing it): the correct hinted samples, at most max_replacements
    of them (a random subset when there are more, in increasing order of their draw), into positions 0, 1, ..."""
    correct = [k for k, ok in enumerate(correct_hinted) if ok]
    if len(correct) > max_replacements:
        pick = torch.randperm(len(correct), generator=generator)[:max_replacements].tolist()
        correct = [correct[p] for p in pick]
    return list(enumerate(correct))


def thaw_high_entropy(hints: torch.Tensor, entropy: torch.Tensor, keep: float) -> torch.Tensor:
    """IGPO's entropy filter (trainer_igpo.py, entropy_clipping_ratio_inpaint): of one sample's hint positions
    `hints` (L,) bool, the max(1, int(n * keep)) of highest `entropy` (L,) are trained on after all; returns the
    hints still left out. keep 0: all of them."""
    if keep <= 0 or not bool(hints.any()):
        return hints
    where = hints.nonzero().squeeze(1)
    top = torch.topk(entropy[where].float(), max(1, int(where.numel() * keep))).indices
    left = hints.clone()
    left[where[top]] = False
    return left


def thaw_hints(whole, inp, micro: list[int], entropy: torch.Tensor, keep: float, thawed: set[str]) -> None:
    """The learner's hook for `thaw_high_entropy`, at each sample's first old pass: `whole` the update's
    EstimatorInput, `inp` the micro-batch's (rows = `micro`), `entropy` (rows, L) under the old policy; the hints
    left out are written to both inputs (so every later pass and the loss normaliser see them); `thawed` holds the
    sample keys already done."""
    if inp.frozen is None:
        return
    for r, i in enumerate(micro):
        hints, key = inp.frozen[r], whole.sample_keys[i]
        if hints is None or key in thawed:
            continue
        left = thaw_high_entropy(hints.bool(), entropy[r, :hints.numel()].detach().cpu(), keep)
        inp.frozen[r] = whole.frozen[i] = left
        thawed.add(key)
