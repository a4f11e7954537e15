"""How many tokens each denoising step unmasks, and CJ-GRPO's EOS early-rejection factor.

- uniform: a block of n tokens over S steps, n // S each, the remainder going to the first steps (LLaDA's split);
- ASS (Ascending Step-Size, CJ-GRPO): S = floor(log2 n) steps, step i unmasks 2^i, the last takes the rest
  (n = 128: 1, 2, 4, 8, 16, 32, 65);
- EOSER: the confidence of a position whose sampled token is EOS is multiplied by gamma(s), which rises from
  gamma_min to 1 over the steps, so early steps rarely commit EOS: linearly, g + (1 - g) * s / (S - 1), or with
  ASS, g + (1 - g) * (2^(s+1) - 1) / 2^S.
"""
from __future__ import annotations

from rollout.sampling import SamplingParams


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


def block_schedule(params: SamplingParams, block_len: int) -> list[int]:
    """Tokens unmasked at each step of a block, for the policies that unmask a fixed count per step."""
    if params.schedule == "ass":
        return ass_schedule(block_len)
    return uniform_schedule(block_len, params.steps_per_block or block_len)


def eoser_gamma(step: int, num_steps: int, gamma_min: float, *, ass: bool = False) -> float:
    """gamma(s) for step s (0-based) of num_steps; 1.0 when there is a single step."""
    if ass:
        return gamma_min + (1.0 - gamma_min) * (2 ** (step + 1) - 1) / 2 ** num_steps
    if num_steps <= 1:
        return 1.0
    return gamma_min + (1.0 - gamma_min) * step / (num_steps - 1)
