"""Per-request decoding state, shared by every decoder: what to sample, what to keep, what to record.

A decoder's job is only to produce logits for each request's still-masked positions of its current block; the
`Row` takes it from there (sample, score, select, record step / log-prob / confidence) and finally becomes a
`Trajectory`. Keeping this in one place is what makes the cached and uncached decoders comparable token for token.
"""
from __future__ import annotations

import secrets

import torch

from rollout.decoding.schedules import block_schedule, eoser_gamma
from rollout.models.spec import DiffusionSpec
from rollout.remasking import make_remasking
from rollout.sampling import GenerationRequest, entropy, processed_logprobs, sample_tokens
from rollout.trajectory import UNDECODED, Trajectory


def check_request(request: GenerationRequest, spec: DiffusionSpec, max_positions: int | None,
                  vocab_size: int) -> str | None:
    """The one-line reason a request cannot be decoded, or None."""
    prompt = request.prompt_ids
    params = request.sampling
    if prompt.dim() != 1:
        return f"prompt_ids must be 1-D, got shape {tuple(prompt.shape)}"
    if prompt.numel() == 0:
        return "empty prompt"
    if params.max_tokens % spec.block_size:
        return f"max_tokens {params.max_tokens} is not a multiple of the block size {spec.block_size}"
    if max_positions is not None and prompt.numel() + params.max_tokens > max_positions:
        return (f"prompt of {prompt.numel()} tokens + max_tokens {params.max_tokens} exceeds the context "
                f"(max_position_embeddings {max_positions})")
    if bool((prompt == spec.mask_token_id).any()):
        return f"the prompt contains the mask token (id {spec.mask_token_id})"
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        return f"prompt token ids must lie in [0, {vocab_size})"
    if params.steps_per_block is not None and params.steps_per_block > spec.block_size:
        return f"steps_per_block {params.steps_per_block} > block size {spec.block_size}"
    return None


def error_trajectory(request: GenerationRequest, message: str, block_size: int, version: int) -> Trajectory:
    empty_long = torch.zeros(0, dtype=torch.long)
    empty_float = torch.zeros(0, dtype=torch.float32)
    prompt = request.prompt_ids.detach().long().cpu().reshape(-1)
    return Trajectory(
        prompt_ids=prompt, response_ids=empty_long, step_map=empty_long.clone(), logprobs=empty_float,
        confidence=empty_float.clone(), valid_length=0, nfe=0, finish_reason=f"error: {message}",
        block_size=block_size, sampling={**request.sampling.to_dict(), "seed": request.seed},
        policy_version=version, request_id=request.request_id,
    )


class Row:
    """One request being decoded: its canvas of response tokens and everything recorded about them."""

    def __init__(self, index: int, request: GenerationRequest, spec: DiffusionSpec, device: torch.device):
        self.index = index  # position in the caller's request list
        self.request = request
        self.params = request.sampling
        self.spec = spec
        self.seed = request.seed if request.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.remasking = make_remasking(self.params)
        self.prompt = request.prompt_ids.to(device=device, dtype=torch.long)
        length = self.params.max_tokens
        self.tokens = torch.full((length,), spec.mask_token_id, dtype=torch.long, device=device)
        self.decoded = torch.zeros(length, dtype=torch.bool, device=device)
        self.step_map = torch.full((length,), UNDECODED, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(length, dtype=torch.float32, device=device)
        self.confidence = torch.zeros(length, dtype=torch.float32, device=device)
        self.schedule = block_schedule(self.params, spec.block_size)
        self.block = 0
        self.step = 0  # global denoising step of this request
        self.step_in_block = 0
        self.nfe = 0
        self.finish_reason: str | None = None

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def prompt_len(self) -> int:
        return int(self.prompt.numel())

    @property
    def block_start(self) -> int:
        return self.block * self.spec.block_size

    @property
    def block_end(self) -> int:
        return self.block_start + self.spec.block_size

    @property
    def num_blocks(self) -> int:
        return self.params.max_tokens // self.spec.block_size

    def block_masked(self) -> torch.Tensor:
        """Response positions of the current block still masked, ascending."""
        start = self.block_start
        return (~self.decoded[start:self.block_end]).nonzero().squeeze(-1) + start

    @property
    def block_done(self) -> bool:
        return bool(self.decoded[self.block_start:self.block_end].all())

    # ------------------------------------------------------------------------------------------ one step
    def draw_uniforms(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self.params.greedy:
            return None
        return torch.rand(n, 1, generator=self.generator, device=device, dtype=torch.float32)

    def keep(self, positions: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor,
             ent: torch.Tensor | None) -> int:
        """Score the sampled tokens (EOSER), let the remasking policy choose, record what it keeps."""
        params = self.params
        confidence = logp.exp()
        if params.eoser_gamma_min is not None:
            gamma = eoser_gamma(min(self.step_in_block, len(self.schedule) - 1), len(self.schedule),
                                params.eoser_gamma_min, ass=params.schedule == "ass")
            confidence = torch.where(tokens == self.spec.eos_token_id, confidence * gamma, confidence)
        count = self.schedule[self.step_in_block] if self.step_in_block < len(self.schedule) \
            else positions.numel()
        chosen = self.remasking.select(confidence, ent, count, self.generator)
        where = positions[chosen]
        self.tokens[where] = tokens[chosen]
        self.decoded[where] = True
        self.step_map[where] = self.step
        self.logprobs[where] = logp[chosen]
        self.confidence[where] = confidence[chosen]
        self.step += 1
        self.step_in_block += 1
        return int(chosen.numel())

    def next_block(self) -> None:
        self.block += 1
        self.step_in_block = 0

    def finish_if_done(self) -> bool:
        """After a completed block: stop on EOS (when asked) or when the budget is spent; else move on."""
        if self.params.stop_at_eos and bool((self.tokens[self.block_start:self.block_end]
                                             == self.spec.eos_token_id).any()):
            self.finish_reason = "eos"
        elif self.block + 1 >= self.num_blocks:
            self.finish_reason = "length"
        return self.finish_reason is not None

    # ------------------------------------------------------------------------------------------ result
    def trajectory(self, version: int, decoder: str) -> Trajectory:
        length = int(self.decoded.sum())
        if not bool(self.decoded[:length].all()):
            raise RuntimeError(f"request {self.request.request_id!r}: decoded positions are not a prefix")
        response = self.tokens[:length].cpu()
        eos = (response == self.spec.eos_token_id).nonzero()
        valid = int(eos[0]) + 1 if eos.numel() else length
        reason = self.finish_reason or "length"
        if reason == "length" and eos.numel():
            reason = "eos"
        return Trajectory(
            prompt_ids=self.prompt.cpu(), response_ids=response, step_map=self.step_map[:length].cpu(),
            logprobs=self.logprobs[:length].cpu(), confidence=self.confidence[:length].cpu(),
            valid_length=valid, nfe=self.nfe, finish_reason=reason, block_size=self.spec.block_size,
            sampling={**self.params.to_dict(), "seed": self.seed, "decoder": decoder},
            policy_version=version, request_id=self.request.request_id,
        )


def denoise_rows(rows: list[Row], logits: torch.Tensor, positions: list[torch.Tensor]) -> int:
    """One denoising step for several rows from their concatenated (sum n_i, V) logits; returns tokens unmasked.

    Rows sharing sampling params are processed as one matrix (the vocabulary-wide work); each row still draws its
    uniforms from its own generator, in its own order, so results do not depend on the batch.
    """
    counts = [p.numel() for p in positions]
    chunks = torch.split(logits, counts)
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.params, []).append(i)
    unmasked = 0
    for params, members in groups.items():
        group_logits = chunks[members[0]] if len(members) == 1 else torch.cat([chunks[i] for i in members])
        logp_all = processed_logprobs(group_logits, params)
        uniforms = None
        if not params.greedy:
            uniforms = torch.cat([rows[i].draw_uniforms(counts[i], logits.device) for i in members])
        tokens, logp = sample_tokens(logp_all, params, uniforms=uniforms)
        ent = entropy(logp_all) if rows[members[0]].remasking.needs_entropy else None
        sizes = [counts[i] for i in members]
        split_ent = torch.split(ent, sizes) if ent is not None else [None] * len(members)
        for i, t, lp, e in zip(members, torch.split(tokens, sizes), torch.split(logp, sizes), split_ent):
            unmasked += rows[i].keep(positions[i], t, lp, e)
    return unmasked


def forward_at(policy, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_bias: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor, cache=None) -> torch.Tensor:
    """One forward; logits (N, V) only at query positions (rows[i], cols[i]): the vocabulary projection is a large
    share of a small model's cost and only the positions being sampled need it."""
    if policy.native:
        out = policy.forward(input_ids, position_ids, attn_bias, past_key_values=cache, use_cache=cache is not None,
                             compute_logits=False, return_hidden=True)
        return policy.logits_from_hidden(out.hidden[rows, cols])
    if cache is not None:
        raise ValueError("KV-cached decoding needs a transformers-native model; use kv_cache='none' for "
                         "models that ship their own code")
    out = policy.forward(input_ids, position_ids, attn_bias)
    return out.logits[rows, cols]
