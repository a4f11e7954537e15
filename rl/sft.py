"""Supervised fine-tuning of diffusion LMs: masked-token cross-entropy on responses, to get a starting policy.

Objectives (`SFTConfig.objective`):
- "block" (block-causal models: SDAR/TraDo, tiny block models): every block of the response is masked at its own
  level (`rl.masking.block_elbo`: l_b ~ U{1..n_b} tokens of block b), and all blocks are trained in ONE forward
  through the training layout `[prompt | clean | noisy]`, where noisy block b sees the clean blocks < b.
- "random" (full attention: LLaDA, Dream): l ~ U{1..L} response tokens masked at once (`rl.masking.mc_elbo`),
  layout `[prompt | noisy]`.
- "auto": "block" for block-causal models, "random" otherwise.
The loss is the mean cross-entropy over masked tokens ("uniform" weighting), or with `elbo_weighting` the
sampler's ELBO weights (n_b / l_b per token, the 1/t of MDLM/LLaDA) summed and divided by the number of response
tokens: an unbiased estimate of the negative ELBO per token.

Responses are the answer tokens followed by EOS, padded with EOS to a multiple of the block size (block models:
decoding stops after the block holding EOS) or to `response_len` (full attention: the model must learn to fill
the rest of its canvas with EOS). Masks of example i at step s come from `sample_generator(seed, i, s, "sft")`
and the batch order from a `torch.Generator` seeded with `seed`: a run is a function of its seed alone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rl.masking import MaskDraw, block_elbo, mc_elbo, sample_generator
from rl.optim import OptimConfig, apply_lr, clip_grads, make_optimizer, param_groups

OBJECTIVES = ("auto", "block", "random")


@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 20
    schedule: str = "cosine"  # constant | cosine | linear
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    objective: str = "auto"  # auto | block | random
    elbo_weighting: bool = False
    response_len: int | None = None  # full attention: EOS-pad responses to this length (None: longest, rounded)
    seed: int = 0
    eval_every: int = 0  # held-out masked loss every N steps (0: only before and after)
    eval_draws: int = 2  # mask draws per held-out example

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"sft.objective: unknown objective {self.objective!r} ({' | '.join(OBJECTIVES)})")
        for name in ("steps", "batch_size", "eval_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.warmup_steps < 0:
            raise ValueError("sft: eval_every and warmup_steps must be >= 0")

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, betas=self.betas, weight_decay=self.weight_decay,
                           warmup_steps=self.warmup_steps, schedule=self.schedule, total_steps=self.steps,
                           min_lr_ratio=self.min_lr_ratio)


@dataclass(frozen=True)
class Example:
    prompt_ids: torch.Tensor  # (P,) long, chat template applied
    response_ids: torch.Tensor  # (L,) long: answer + EOS + EOS padding


@dataclass
class SFTResult:
    history: list[dict] = field(default_factory=list)  # one dict per logged step
    heldout_before: float | None = None
    heldout_after: float | None = None
    wall_s: float = 0.0


def resolve_objective(policy, objective: str) -> str:
    if objective == "auto":
        return "block" if policy.spec.is_block else "random"
    if objective == "block" and not policy.spec.is_block:
        raise ValueError("sft.objective: 'block' needs a block-causal model; use 'random' for full attention")
    return objective


def make_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], spec,
                 response_len: int | None = None) -> Example:
    """The SFT pair: answer + EOS, EOS-padded to the end of its last block, or to `response_len` if given.

    Blocks follow the model's alignment: under `absolute` (SDAR/TraDo) the first block also holds the prompt's
    tail (P mod B tokens), so the response is padded until prompt + response fills whole blocks."""
    response = list(answer_ids) + [spec.eos_token_id]
    if response_len is not None:
        if len(response) > response_len:
            raise ValueError(f"sft.response_len: an answer of {len(answer_ids)} tokens + EOS exceeds {response_len}")
        target = response_len
    else:
        head = len(prompt_ids) - spec.block_origin(len(prompt_ids)) if spec.is_block else 0
        target = math.ceil((head + len(response)) / spec.block_size) * spec.block_size - head
    response += [spec.eos_token_id] * (target - len(response))
    return Example(torch.tensor(list(prompt_ids), dtype=torch.long), torch.tensor(response, dtype=torch.long))


def draw_mask(objective: str, length: int, block_size: int, generator: torch.Generator) -> MaskDraw:
    if objective == "block":
        return block_elbo(length, generator, block_size=block_size, num_samples=1)
    return mc_elbo(length, generator, num_samples=1)


def masked_loss(policy, examples: Sequence[Example], draws: Sequence[MaskDraw], *,
                elbo_weighting: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch under the given mask draws (one per example) in one forward; (loss, metrics).

    metrics: `masked_ce` (mean cross-entropy over masked tokens) and `nelbo_per_token` (ELBO-weighted NLL over the
    number of response tokens), whichever weighting the loss uses."""
    mask_id = policy.spec.mask_token_id
    prompts = [ex.prompt_ids for ex in examples]
    responses = [ex.response_ids for ex in examples]
    masks = [d.masks[0] for d in draws]
    noisy = [torch.where(m, torch.full_like(r, mask_id), r) for r, m in zip(responses, masks)]
    scores = policy.score_responses(prompts, responses, noisy, score_mask=masks)
    device = scores.logprobs.device
    weights = torch.zeros_like(scores.logprobs)
    for b, draw in enumerate(draws):
        weights[b, :draw.token_weights.shape[1]] = draw.token_weights[0].to(device=device, dtype=weights.dtype)
    nll = -torch.where(scores.valid, scores.logprobs, torch.zeros_like(scores.logprobs))
    num_masked = scores.valid.sum().clamp(min=1)
    masked_ce = nll.sum() / num_masked
    num_tokens = sum(r.numel() for r in responses)
    nelbo = (weights * nll).sum() / num_tokens
    loss = nelbo if elbo_weighting else masked_ce
    return loss, {"masked_ce": float(masked_ce.detach()), "nelbo_per_token": float(nelbo.detach()),
                  "masked_tokens": float(num_masked)}


@torch.no_grad()
def heldout_loss(policy, examples: Sequence[Example], *, objective: str = "auto", seed: int = 12345,
                 draws: int = 2, batch_size: int = 64) -> float:
    """Mean masked-token cross-entropy on `examples` under fixed mask draws (same masks before and after training:
    a paired comparison)."""
    objective = resolve_objective(policy, objective)
    was_training = policy.model.training
    policy.model.eval()
    total, count = 0.0, 0.0
    try:
        for d in range(draws):
            for start in range(0, len(examples), batch_size):
                batch = list(examples[start:start + batch_size])
                masks = [draw_mask(objective, ex.response_ids.numel(), policy.spec.block_size,
                                   sample_generator(seed, start + i, d, "heldout")) for i, ex in enumerate(batch)]
                _, metrics = masked_loss(policy, batch, masks)
                total += metrics["masked_ce"] * metrics["masked_tokens"]
                count += metrics["masked_tokens"]
    finally:
        policy.model.train(was_training)
    return total / max(count, 1.0)


def train_sft(policy, examples: Sequence[Example], config: SFTConfig, *, heldout: Sequence[Example] = (),
              on_log: Callable[[dict], None] | None = None, progress: bool = False) -> SFTResult:
    """Train `policy` in place on `examples` for `config.steps` optimizer steps; returns the loss history and the
    held-out masked loss before and after (when `heldout` is given)."""
    if not examples:
        raise ValueError("sft: no training examples")
    objective = resolve_objective(policy, config.objective)
    optim = config.optim()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(param_groups(policy.model.named_parameters(), lr=config.lr,
                                            weight_decay=config.weight_decay), optim)
    order_gen = torch.Generator().manual_seed(config.seed)
    out = SFTResult()
    eval_kwargs = dict(objective=objective, seed=config.seed + 1, draws=config.eval_draws)
    if heldout:
        out.heldout_before = heldout_loss(policy, heldout, **eval_kwargs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="sft", unit="step")
    start = time.perf_counter()
    order: list[int] = []
    policy.model.train()
    try:
        for step in range(config.steps):
            if len(order) < config.batch_size:  # fresh epochs as needed; an epoch is a permutation
                order += torch.randperm(len(examples), generator=order_gen).tolist()
            index, order = order[:config.batch_size], order[config.batch_size:]
            batch = [examples[i] for i in index]
            draws = [draw_mask(objective, examples[i].response_ids.numel(), policy.spec.block_size,
                               sample_generator(config.seed, i, step, "sft")) for i in index]
            lr = apply_lr(optimizer, step, optim)
            loss, metrics = masked_loss(policy, batch, draws, elbo_weighting=config.elbo_weighting)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = clip_grads(params, config.grad_clip)
            if torch.isfinite(norm):
                optimizer.step()
            record = {"step": step + 1, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(norm),
                      "elapsed_s": time.perf_counter() - start, **metrics}
            if heldout and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                record["heldout_masked_ce"] = heldout_loss(policy, heldout, **eval_kwargs)
                policy.model.train()
            out.history.append(record)
            if on_log is not None:
                on_log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
    finally:
        if bar is not None:
            bar.close()
        policy.model.eval()
    out.wall_s = time.perf_counter() - start
    if heldout:
        out.heldout_after = heldout_loss(policy, heldout, **eval_kwargs)
    return out
