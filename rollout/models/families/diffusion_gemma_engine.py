"""The rollout engine for DiffusionGemma: requests -> Trajectory records carrying a CanvasTrace.

It is TorchEngine for everything but decoding (weight updates in the same wire format, sleep / wake), and decodes
with DiffusionGemma's own sampler (diffusion_gemma_sampler.py). The sampler settings are the checkpoint's
generation_config.json (the published ones for the released model), with the request's entropy bound and steps
per block (max_denoising_steps) applied on top.

Trajectory fields for this family: response_ids = the argmax canvases (what generate returns), pad after the first
EOS; logprobs[i] = the sum of the rollout log-probs of every action at position i (one per step that accepted a
token there and kept it); step_map[i] = the row's global step of the last action at i (its block's last step when
none), so TraceRL's per-step grouping ranks positions by when they settled; confidence = 0 (the sampler ranks by
entropy, recorded in the trace as the acceptance mask).
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import torch

from rollout.canvas_trace import CanvasTrace
from rollout.decoding.state import error_trajectory
from rollout.engine import TorchEngine
from rollout.models.families.diffusion_gemma_sampler import DecodedRow, SamplerSettings, decode_rows
from rollout.sampling import GenerationRequest
from rollout.trajectory import Trajectory


class DiffusionGemmaEngine(TorchEngine):
    def __init__(self, policy, *, max_batch_size: int = 64, progress: bool = False, kv_cache: str = "auto",
                 bucket_bytes: int = 256 * 1024 * 1024, memory_budget=None, spill_dir: str | Path | None = None):
        if kv_cache not in ("auto", "block", "none"):
            raise ValueError(f"engine.kv_cache: DiffusionGemma always decodes against its encoder cache; got "
                             f"{kv_cache!r}")
        if memory_budget is not None:
            raise ValueError("rollout.memory_budget: not supported for DiffusionGemma (batches of max_batch_size)")
        self._init_state(policy, max_batch_size=max_batch_size, progress=progress, bucket_bytes=bucket_bytes,
                         spill_dir=spill_dir)
        self.kv_cache = "encoder"
        self.memory_budget = None
        self.max_positions = int(policy.causal_lm.config.text_config.max_position_embeddings)
        self.vocab_size = policy.spec.vocab_size
        self.settings = SamplerSettings.from_generation_config(policy.causal_lm.generation_config)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Trajectory]:
        self.wake()
        spec = self.policy.spec
        results: list[Trajectory | None] = [None] * len(requests)
        ready: list[tuple[int, SamplerSettings]] = []
        for i, request in enumerate(requests):
            problem, settings = self._check(request)
            if problem is None:
                ready.append((i, settings))
            else:
                results[i] = error_trajectory(request, problem, spec.canvas_length, self.policy_version)
        # One decoding batch per (settings, budget), short prompts together; each row has its own generator.
        ready.sort(key=lambda item: (repr(item[1]), requests[item[0]].sampling.max_tokens,
                                     requests[item[0]].prompt_ids.numel()))
        start = 0
        while start < len(ready):
            key = (ready[start][1], requests[ready[start][0]].sampling.max_tokens)
            group = [ready[start]]
            while (start + len(group) < len(ready) and len(group) < self.max_batch_size
                   and (ready[start + len(group)][1], requests[ready[start + len(group)][0]].sampling.max_tokens) == key):
                group.append(ready[start + len(group)])
            start += len(group)
            seeds = [requests[i].seed if requests[i].seed is not None else secrets.randbits(63) for i, _ in group]
            gens = [torch.Generator(device=self._device).manual_seed(int(s)) for s in seeds]
            rows = decode_rows(self.policy, [requests[i].prompt_ids.long() for i, _ in group], key[0], key[1], gens)
            for (i, settings), seed, row in zip(group, seeds, rows):
                results[i] = trajectory_of(requests[i], row, settings, seed, self.policy_version)
        return results  # type: ignore[return-value]

    def _check(self, request: GenerationRequest) -> tuple[str | None, SamplerSettings | None]:
        prompt, params = request.prompt_ids, request.sampling
        if prompt.dim() != 1 or prompt.numel() == 0:
            return f"prompt_ids must be a non-empty 1-D tensor, got shape {tuple(prompt.shape)}", None
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.vocab_size:
            return f"prompt token ids must lie in [0, {self.vocab_size})", None
        if params.max_tokens % self.policy.spec.canvas_length:
            return (f"max_tokens {params.max_tokens} is not a multiple of the canvas length "
                    f"{self.policy.spec.canvas_length}"), None
        if prompt.numel() + params.max_tokens > self.max_positions:
            return f"prompt + max_tokens exceeds max_position_embeddings {self.max_positions}", None
        try:
            return None, self.settings.with_params(params)
        except ValueError as err:
            return str(err), None


def trajectory_of(request: GenerationRequest, row: DecodedRow, settings: SamplerSettings, seed: int,
                  version: int) -> Trajectory:
    logprobs, step_map = position_summaries(row.trace)
    sampling = {**request.sampling.to_dict(), "seed": seed, "decoder": "diffusion_gemma_entropy_bound",
                "max_denoising_steps": settings.max_denoising_steps, "t_min": settings.t_min,
                "t_max": settings.t_max, "stability_threshold": settings.stability_threshold,
                "confidence_threshold": settings.confidence_threshold}
    return Trajectory(
        prompt_ids=request.prompt_ids.detach().long().cpu(), response_ids=row.response.long(), step_map=step_map,
        logprobs=logprobs, confidence=torch.zeros(row.response.numel()), valid_length=row.valid_length,
        nfe=row.nfe, finish_reason=row.finish_reason, block_size=row.trace.canvas_length, sampling=sampling,
        policy_version=version, request_id=request.request_id, canvas_trace=row.trace)


def position_summaries(trace: CanvasTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response position: the summed action log-probs and the global step of its last action (its block's last
    step when it has none)."""
    c, actions = trace.canvas_length, trace.actions()
    blocks = int(trace.block[-1]) + 1
    logprobs = torch.zeros(blocks * c)
    step_map = torch.zeros(blocks * c, dtype=torch.long)
    steps = torch.arange(trace.num_steps)
    for k in range(blocks):
        mine = trace.block == k
        span = slice(k * c, (k + 1) * c)
        logprobs[span] = (trace.action_logprobs[mine] * actions[mine]).sum(0)
        last = int(steps[mine].max())
        stamped = torch.where(actions[mine], steps[mine][:, None], torch.full_like(actions[mine], -1, dtype=torch.long))
        step_map[span] = torch.where(stamped.max(0).values >= 0, stamped.max(0).values, torch.tensor(last))
    return logprobs, step_map
