"""What a diffusion language model *is*, as far as decoding and training need to know."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from rollout.errors import OneLineError

Attention = Literal["block_causal", "full"]

# Model kinds diffrl knows how to drive. "block" is any HF causal LM (Qwen2/Qwen3/Llama) run as a block-diffusion
# model; "sdar" is a TraDo/SDAR checkpoint (Qwen3 weights, model_type "sdar"); "llada" and "dream" are
# full-attention masked diffusion models, Dream predicting token i from position i-1; "llada2" is inclusionAI's
# LLaDA2.0/2.1 MoE block-diffusion model (its own modelling code: rollout/models/families/llada2.py);
# "diffusion_gemma" is transformers' DiffusionGemma (rollout/models/families/diffusion_gemma.py).
KINDS = ("block", "sdar", "llada", "dream", "llada2", "diffusion_gemma")
# Tokens unmasked per step, by family (rollout/decoding/schedules.py): LLaDA's even split, Dream's own schedule.
STEP_SCHEDULES = {"block": "uniform", "sdar": "uniform", "llada": "uniform", "dream": "dream", "llada2": "uniform"}
# What a sampled token's confidence is, by family: "model", its probability under the untempered, unfiltered
# model (LLaDA's generate, Fast-dLLM, CJ-GRPO's trainers), or "sampling", under the distribution it was sampled
# from (Dream's _sample). Equal at temperature 1 without top-k/top-p, and when greedy.
# LLaDA2's generate ranks by the probability under its tempered, filtered sampling distribution.
CONFIDENCE_SOURCES = {"block": "sampling", "sdar": "sampling", "llada": "model", "dream": "sampling",
                      "llada2": "sampling"}


class ModelLoadError(OneLineError):
    """A checkpoint directory, tokenizer or model setting is unusable; the message names the file or field."""


# Block alignment (what it means: rollout/models/masks.py). Positions count from the first real token.
ALIGNMENTS = ("absolute", "response")


def check_alignment(alignment: str) -> str:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"model.block_alignment: unknown alignment {alignment!r} (expected one of "
                         f"{', '.join(ALIGNMENTS)})")
    return alignment


def block_origin(prompt_len: int, block_size: int, alignment: str) -> int:
    """Sequence position where the first decoding block starts: `absolute` = the prompt length rounded down to a
    multiple of the block (TraDo's `num_prefill_tokens`), `response` = the prompt length."""
    if check_alignment(alignment) == "absolute":
        return prompt_len // block_size * block_size
    return prompt_len


@dataclass(frozen=True)
class DiffusionSpec:
    kind: str
    mask_token_id: int
    pad_token_id: int
    eos_token_id: int
    block_size: int  # decoding/training block; for full-attention models the semi-autoregressive block
    attention: Attention
    logits_shift: bool  # True: logits at position i-1 predict token i (Dream)
    step_schedule: str | None = None  # the family's tokens-per-step schedule; None: the kind's (STEP_SCHEDULES)
    confidence_source: str | None = None  # "model" or "sampling"; None: the kind's (CONFIDENCE_SOURCES)
    # Where blocks start (block-causal models; see masks.py): "absolute" = counted from the sequence's first token
    # (SDAR/TraDo as trained), "response" = from the response start. Full-attention models: always "response"
    # (LLaDA's and Dream's semi-autoregressive blocks start at the response).
    block_alignment: str = "response"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelLoadError(f"model.kind: unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if self.step_schedule is None:
            object.__setattr__(self, "step_schedule", STEP_SCHEDULES[self.kind])
        if self.step_schedule not in ("uniform", "dream", "ass"):
            raise ModelLoadError(f"model.step_schedule: unknown schedule {self.step_schedule!r}")
        if self.confidence_source is None:
            object.__setattr__(self, "confidence_source", CONFIDENCE_SOURCES[self.kind])
        if self.confidence_source not in ("model", "sampling"):
            raise ModelLoadError(f"model.confidence_source: {self.confidence_source!r} is not 'model' or 'sampling'")
        if self.block_size < 1:
            raise ModelLoadError(f"model.block_size: must be >= 1, got {self.block_size}")
        if self.attention not in ("block_causal", "full"):
            raise ModelLoadError(f"model.attention: unknown layout {self.attention!r}")
        if self.block_alignment not in ALIGNMENTS:
            raise ModelLoadError(f"model.block_alignment: unknown alignment {self.block_alignment!r} "
                                 f"(expected one of {', '.join(ALIGNMENTS)})")
        if self.attention == "full" and self.block_alignment != "response":
            raise ModelLoadError("model.block_alignment: full-attention models decode blocks from the response "
                                 "start ('response'); 'absolute' applies to block-causal models only")
        if self.mask_token_id in (self.pad_token_id, self.eos_token_id):
            raise ModelLoadError("tokenizer: the mask token must differ from the pad and eos tokens")

    @property
    def is_block(self) -> bool:
        return self.attention == "block_causal"

    def block_origin(self, prompt_len: int) -> int:
        """Sequence position where the first decoding block starts (== prompt_len under `response`)."""
        return block_origin(prompt_len, self.block_size, self.block_alignment)

    def to_dict(self) -> dict:
        return asdict(self)


def default_spec_fields(kind: str) -> dict:
    """Layout facts per kind: the published models' conventions."""
    if kind == "sdar":  # SDAR's training and generate, TraDo's engine: blocks from the sequence start
        return {"attention": "block_causal", "logits_shift": False, "block_size": 4, "block_alignment": "absolute"}
    if kind == "block":  # diffrl's own block models (from AR checkpoints): blocks from the response start
        return {"attention": "block_causal", "logits_shift": False, "block_size": 4, "block_alignment": "response"}
    if kind == "llada2":  # LLaDA2's generate: block 32, blocks counted from the sequence start
        return {"attention": "block_causal", "logits_shift": False, "block_size": 32, "block_alignment": "absolute"}
    if kind == "llada":
        return {"attention": "full", "logits_shift": False, "block_size": 32}
    if kind == "dream":
        return {"attention": "full", "logits_shift": True, "block_size": 32}
    if kind == "diffusion_gemma":  # the released model's canvas (its config.json's canvas_length)
        return {"attention": "full", "logits_shift": False, "block_size": 256}
    raise ModelLoadError(f"model.kind: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
