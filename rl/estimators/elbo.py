"""Mask-sampling likelihood estimators: one_step (d1), mc_elbo (LLaDA), sdmc (GDPO), coupled (DiffuCoder),
block_elbo (BD3-LM/SDAR), block_random (SPG), random_mask (UniGRPO).

Each draws K masked copies of every response with the sampler of the same name in `rl.masking` (per-sample
generators: common random numbers), scores the masked positions of all B*K copies in batched forward passes, and
combines them with the sampler's token weights:
- `seq_logp`   = sum_k sum_i w_ki log p_ki over the tokens through the first EOS (`valid_lengths`): the ELBO
  estimate of the response as the losses define it (the sum of one-step log-probs for one_step);
- `token_elbo` = the per-token terms of that sum;
- `token_logp` = the plain log-prob of each token averaged over the copies that masked it, for token-level ratios;
- `extra["mc_logp"]`, `extra["mc_weights"]` = the per-copy terms (B, K, L), for SPG's upper bound.
Masks cover the whole decoded response (what the model generated, trailing EOS padding included); `token_mask`
limits token-level losses to tokens through the first EOS, `seq_logp` sums only those (padding after the first EOS
is context, never a term of the likelihood, as in GDPO's and SPG's code).
"""
from __future__ import annotations

import torch

from rl.estimators.base import ESTIMATORS, Estimate, EstimatorInput, token_mask_of
from rl.masking import MaskDraw, draw_masks
from rollout.models.layout import RowPacking, score_packing

# Masked copies scored per forward call: bounds activation memory on long responses.
MAX_ROWS_PER_FORWARD = 64


def score_draws(policy, inp: EstimatorInput, draws: list[MaskDraw], *, temperature: float = 1.0,
                return_entropy: bool = False, return_hidden: bool = False,
                max_rows: int = MAX_ROWS_PER_FORWARD, packing: RowPacking | None = None) -> Estimate:
    """Score every masked copy of every sample and combine them with the draws' weights (packing: several copies
    share a row, rollout/models/layout.py; the draws and so the scores per copy are the same)."""
    mask_id = policy.spec.mask_token_id
    rows = []  # (sample, copy k)
    for b, draw in enumerate(draws):
        rows.extend((b, k) for k in range(draw.num_forwards))
    width = max(inp.length(b) for b in range(len(inp)))
    device = policy.device
    bsz = len(inp)
    elbo_terms = torch.zeros((bsz, width), device=device)
    plain_sum = torch.zeros((bsz, width), device=device)
    times_masked = torch.zeros((bsz, width), device=device)
    k_max = max(d.num_forwards for d in draws)
    # Per-forward terms for losses that need more than the weighted sum (SPG's EUBO): (B, K, L).
    mc_logp = torch.zeros((bsz, k_max, width), device=device)
    mc_weights = torch.zeros((bsz, k_max, width), device=device)
    entropy = torch.zeros((bsz, width), device=device) if return_entropy else None
    hidden = torch.zeros((bsz, width, policy.hidden_size), device=device) if return_hidden else None
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        prompts, clean, noisy, score = [], [], [], []
        for b, k in chunk:
            draw, response, prompt = draws[b], inp.responses[b], inp.prompts[b]
            masks = draw.masks[k]
            noisy.append(torch.where(masks, torch.full_like(response, mask_id), response))
            if draw.prompt_masks is not None and draw.prompt_masks.shape[1]:
                prompt = torch.where(draw.prompt_masks[k], torch.full_like(prompt, mask_id), prompt)
            prompts.append(prompt)
            clean.append(response)
            score.append(masks)
        out = policy.score_responses(prompts, clean, noisy, score_mask=score, temperature=temperature,
                                     return_entropy=return_entropy, return_hidden=return_hidden,
                                     **score_packing(packing))
        for row, (b, k) in enumerate(chunk):
            n = inp.length(b)
            weights = draws[b].token_weights[k].to(device)
            masked = draws[b].masks[k].to(device)
            logp = out.logprobs[row, :n]
            elbo_terms[b, :n] = elbo_terms[b, :n] + weights * logp
            mc_logp[b, k, :n] = torch.where(masked, logp, torch.zeros_like(logp))
            mc_weights[b, k, :n] = weights
            plain_sum[b, :n] = plain_sum[b, :n] + torch.where(masked, logp, torch.zeros_like(logp))
            times_masked[b, :n] = times_masked[b, :n] + masked
            if return_entropy:
                entropy[b, :n] = entropy[b, :n] + torch.where(masked, out.entropy[row, :n], 0.0)
            if return_hidden:
                hidden[b, :n] = torch.where(masked[:, None], out.hidden[row, :n], hidden[b, :n])
    seen = times_masked > 0
    token_logp = plain_sum / times_masked.clamp(min=1)
    if return_entropy:
        entropy = entropy / times_masked.clamp(min=1)
    valid = token_mask_of(inp, device)
    return Estimate(
        token_logp=token_logp, seq_logp=(elbo_terms * valid).sum(-1), token_mask=valid & seen,
        forwards=max(d.num_forwards for d in draws), entropy=entropy, hidden=hidden,
        extra={"token_elbo": elbo_terms, "mc_logp": mc_logp, "mc_weights": mc_weights},
    )


def _estimate(sampler: str, policy, inp: EstimatorInput, seed: int, inner_iter: int, options: dict,
              temperature: float, return_entropy: bool, return_hidden: bool, packing: RowPacking | None = None,
              draw_index: int | None = None) -> Estimate:
    lengths = [inp.length(b) for b in range(len(inp))]
    draws = draw_masks(sampler, lengths, inp.sample_keys, base_seed=seed, inner_iter=inner_iter, **options)
    return _score_selected(policy, inp, draws, draw_index, temperature=temperature, return_entropy=return_entropy,
                           return_hidden=return_hidden, packing=packing)


def select_draw(draws: list[MaskDraw], index: int | None) -> list[MaskDraw]:
    """Each sample's forward `index` alone, its weights unchanged (so the per-draw estimates of one sample add up
    to its full estimate): BGPO backpropagates one Monte Carlo draw at a time. None: every draw."""
    if index is None:
        return draws
    out = []
    for draw in draws:
        if not 0 <= index < draw.num_forwards:
            raise ValueError(f"estimator: draw_index {index} outside the sample's {draw.num_forwards} draws")
        pick = slice(index, index + 1)
        out.append(MaskDraw(draw.masks[pick], draw.token_weights[pick], draw.t[pick],
                            None if draw.prompt_masks is None else draw.prompt_masks[pick]))
    return out


def _score_selected(policy, inp: EstimatorInput, draws: list[MaskDraw], draw_index: int | None, **kwargs) -> Estimate:
    est = score_draws(policy, inp, select_draw(draws, draw_index), **kwargs)
    est.extra["num_draws"] = max(d.num_forwards for d in draws)  # of the whole estimate, even when one is scored
    return est


def _register(name: str, **defaults):
    """Register a sampler-backed estimator: its keyword options go to the sampler of the same name."""

    def estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0, temperature: float = 1.0,
                  return_entropy: bool = False, return_hidden: bool = False, packing: RowPacking | None = None,
                  draw_index: int | None = None, **options) -> Estimate:
        if name == "block_elbo":
            if not policy.spec.is_block:
                raise ValueError("estimator 'block_elbo' needs a block-diffusion model (model attention is full)")
            options = {**defaults, **options}
            options.setdefault("block_size", inp.block_size or policy.spec.block_size)
            return _per_sample("block_elbo", policy, inp, seed, inner_iter, options, temperature, return_entropy,
                               return_hidden, lambda b: {"offset": _block_offset(policy, inp, b)}, packing,
                               draw_index)
        if name == "block_random":  # SPG: semi-autoregressive blocks of the rollout on a full-attention model
            options = {**defaults, **options}
            options.setdefault("block_size", inp.block_size or policy.spec.block_size)
            return _per_sample("block_random", policy, inp, seed, inner_iter, options, temperature, return_entropy,
                               return_hidden, lambda b: {"prompt_length": inp.prompts[b].numel(),
                                                         "offset": _block_offset(policy, inp, b),
                                                         "valid_length": inp.valid_length(b)}, packing,
                               draw_index)
        if name == "one_step":
            # d1 masks prompt tokens too; each sample's prompt gets its own draw from the same generator.
            options = {"p_mask": options.get("p_mask", 0.15)}
            return _per_sample("one_step", policy, inp, seed, inner_iter, options, temperature, return_entropy,
                               return_hidden, lambda b: {"prompt_length": inp.prompts[b].numel()}, packing,
                               draw_index)
        if name == "coupled" and options.pop("full_mask_view", False):
            if draw_index is not None:
                raise ValueError("estimator 'coupled' with full_mask_view: no per-draw scoring (draw_index)")
            return _coupled_with_full_view(policy, inp, seed, inner_iter, {**defaults, **options}, temperature,
                                           return_entropy, return_hidden, packing)
        return _estimate(name, policy, inp, seed, inner_iter, {**defaults, **options}, temperature,
                         return_entropy, return_hidden, packing, draw_index)

    estimator.__name__ = f"{name}_estimator"
    estimator.__doc__ = f"Mask-sampling estimator backed by `rl.masking.{name}`."
    ESTIMATORS.register(name, **defaults)(estimator)
    return estimator


def _coupled_with_full_view(policy, inp, seed, inner_iter, options, temperature, return_entropy,
                            return_hidden, packing=None) -> Estimate:
    """DiffuCoder's three views: token log p = (log p_full + w log p_partial) / 2, w = 1/t or 1/(1-t).

    The coupled sampler's weights are already w/2 (both partial views halved), so the fully masked view enters
    with weight 1/2; the per-token value used for ratios is that same combination.
    """
    lengths = [inp.length(b) for b in range(len(inp))]
    draws = draw_masks("coupled", lengths, inp.sample_keys, base_seed=seed, inner_iter=inner_iter, **options)
    full = []
    for draw, n in zip(draws, lengths):
        masks = torch.cat([draw.masks, torch.ones(1, n, dtype=torch.bool)])
        weights = torch.cat([draw.token_weights, torch.full((1, n), 0.5)])
        full.append(MaskDraw(masks, weights, torch.cat([draw.t, torch.ones(1, dtype=draw.t.dtype)])))
    est = score_draws(policy, inp, full, temperature=temperature, return_entropy=return_entropy,
                      return_hidden=return_hidden, packing=packing)
    est.token_logp = est.extra["token_elbo"]
    return est


def _block_offset(policy, inp: EstimatorInput, b: int) -> int:
    """Response tokens missing from sample b's first layout block: under `absolute` alignment the prompt's tail
    fills the start of that block (rollout/models/masks.py), so the samplers' blocks must start that much earlier."""
    prompt_len = inp.prompts[b].numel()
    return prompt_len - policy.spec.block_origin(prompt_len) if policy.spec.is_block else 0


def _per_sample(sampler_name, policy, inp, seed, inner_iter, options, temperature, return_entropy, return_hidden,
                sample_options, packing=None, draw_index: int | None = None) -> Estimate:
    """A sampler that needs per-sample arguments (prompt length, block offset): `sample_options(b)` adds them to
    sample b's draw, which still comes from its own generator (common random numbers whatever the batch)."""
    lengths = [inp.length(b) for b in range(len(inp))]
    draws = draw_masks(sampler_name, lengths, inp.sample_keys, base_seed=seed, inner_iter=inner_iter,
                       sample_options=[sample_options(b) for b in range(len(inp))], **options)
    return _score_selected(policy, inp, draws, draw_index, temperature=temperature, return_entropy=return_entropy,
                           return_hidden=return_hidden, packing=packing)


one_step_estimator = _register("one_step", p_mask=0.15)
mc_elbo_estimator = _register("mc_elbo", num_samples=4)
sdmc_estimator = _register("sdmc", rule="gauss", nodes=3)
coupled_estimator = _register("coupled", num_pairs=1, t_min=0.2, t_max=0.8)
block_elbo_estimator = _register("block_elbo", num_samples=1)
# SPG's published masking (forward_type block_random): a random block partly masked, later blocks fully masked;
# weighting "released": every masked token through the first EOS counts, per-forward mean, as SPG's code.
block_random_estimator = _register("block_random", num_samples=2, p_mask=0.15,  # SPG: num_t 2, p_mask_prompt 0.15
                                   weighting="released")
random_mask_estimator = _register("random_mask", num_samples=2, t_min=0.1, t_max=0.9)
