"""How many tokens each denoising step unmasks, and CJ-GRPO's EOS early-rejection factor.

The step schedule belongs to the model family (DiffusionSpec.step_schedule): LLaDA's even split for LLaDA and
block models, Dream's for Dream; a request may name another (SamplingParams.schedule).
- uniform: a block of n tokens over S steps, n // S each, the remainder going to the first steps (LLaDA's split);
- dream: Dream's `_sample` (generation_utils.py shipped with its checkpoints): with t stepping down
  linspace(1, eps, S + 1) (eps = 1e-3), step i unmasks int(m_i * (1 - t_{i+1} / t_i)) of the m_i tokens still
  masked, in float32 as Dream computes it, and the last step takes the rest. The first step gets one fewer than
  the even split would suggest and the remainder lands on the last step (n = 32, S = 16: 1, 2, 2, ..., 2, 3). A step
  whose count is 0 (S close to n) is skipped: with a fixed count it would change nothing;
  `origin` remasking instead unmasks each masked token independently with probability 1 - t_{i+1} / t_i (1 at
  the last step), see dream_transfer_probability;
- ASS (Ascending Step-Size, CJ-GRPO): S = floor(log2 n) steps, step i unmasks 2^i, the last takes the rest
  (n = 128: 1, 2, 4, 8, 16, 32, 65);
- EOSER: the confidence of a position whose sampled token is EOS is multiplied by gamma(s), which rises from
  gamma_min to 1 over the steps, so early steps rarely commit EOS: linearly, g + (1 - g) * s / (S - 1), or with
  ASS, g + (1 - g) * (2^(s+1) - 1) / 2^S.
"""
from __future__ import annotations

import torch

from rollout.sampling import SCHEDULES, SamplingParams

DREAM_EPS = 1e-3  # Dream's DreamGenerationConfig default (`eps`), the final time of its linspace


def uniform_schedule(length: int, steps: int) -> list[int]:
    if not 1 <= steps <= length:
        raise ValueError(f"sampling.steps_per_block: {steps} steps cannot split a block of {length} tokens")
    base, extra = divmod(length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def ass_schedule(length: int) -> list[int]:
    if length < 1:
        raise ValueError(f"ass_schedule: length must be >= 1, got {length}")
    steps = max(1, length.bit_length() - 1)  # floor(log2 length)
    sizes = [2 ** i for i in range(steps - 1)]
    return sizes + [length - sum(sizes)]


def _dream_times(steps: int, eps: float) -> torch.Tensor:
    # float32 on the CPU, as Dream's torch.linspace(1, eps, steps + 1) (default dtype).
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32, device="cpu")


def dream_transfer_count(n_masked: int, step: int, steps: int, eps: float = DREAM_EPS) -> int:
    """Tokens Dream unmasks at `step` (0-based) of `steps` when `n_masked` are still masked."""
    if step >= steps - 1:
        return n_masked
    t = _dream_times(steps, eps)
    ratio = 1 - t[step + 1] / t[step]
    # float32 as Dream's torch.tensor(n) * ratio; a host scalar by intent (never a device copy, whatever the default)
    return int(torch.full((), n_masked, dtype=torch.float32, device="cpu") * ratio)


def dream_transfer_probability(step: int, steps: int, eps: float = DREAM_EPS) -> float:
    """Dream's `origin` transfer probability 1 - s / t at `step` of `steps` (1 at the last step)."""
    if step >= steps - 1:
        return 1.0
    t = _dream_times(steps, eps)
    return float(1 - t[step + 1] / t[step])


def dream_schedule(length: int, steps: int, eps: float = DREAM_EPS) -> list[int]:
    """Dream's per-step counts for a block of `length` over `steps` steps, zeros included."""
    if not 1 <= steps <= length:
        raise ValueError(f"sampling.steps_per_block: {steps} steps cannot split a block of {length} tokens")
    counts, left = [], length
    for step in range(steps):
        counts.append(dream_transfer_count(left, step, steps, eps))
        left -= counts[-1]
    return counts


def resolve_schedule(params: SamplingParams, family_default: str) -> str:
    """The schedule a request decodes with: its own, else the model family's."""
    name = params.schedule or family_default
    if name not in SCHEDULES:
        raise ValueError(f"sampling.schedule: unknown schedule {name!r} (expected one of {SCHEDULES})")
    return name


def block_schedule(params: SamplingParams, block_len: int, family_default: str = "uniform") -> list[int]:
    """Tokens unmasked at each step of a block, for the policies that unmask a fixed count per step (steps that
    would unmask nothing are dropped)."""
    name = resolve_schedule(params, family_default)
    if name == "ass":
        return ass_schedule(block_len)
    steps = params.steps_per_block or block_len
    if name == "dream":
        return [n for n in dream_schedule(block_len, steps) if n > 0]
    return uniform_schedule(block_len, steps)


def eoser_gamma(step: int, num_steps: int, gamma_min: float, *, ass: bool = False) -> float:
    """gamma(s) for step s (0-based) of num_steps; 1.0 when there is a single step (both of CJ-GRPO's trainers)."""
    if num_steps <= 1:
        return 1.0
    if ass:
        return gamma_min + (1.0 - gamma_min) * (2 ** (step + 1) - 1) / 2 ** num_steps
    return gamma_min + (1.0 - gamma_min) * step / (num_steps - 1)
