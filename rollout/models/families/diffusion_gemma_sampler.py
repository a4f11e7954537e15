"""DiffusionGemma's entropy-bounded sampler with trajectory recording (rollout), and the pure step maths it shares
with the learner's replay (rl/estimators/canvas_trace.py).

Read from transformers 5.23 `models/diffusion_gemma/generation_diffusion_gemma.py` (DiffusionGemmaGenerationMixin.
generate / _denoising_step, EntropyBoundSampler, LinearTemperatureScheduleLogitsProcessor,
StableAndConfidentStoppingCriteria, _finalize_canvas). Per block (canvas) of C tokens:
  canvas <- C uniform random tokens; self-conditioning <- none
  for n = N..1:  logits = decoder(canvas, self-conditioning, encoder cache) / t(n),  t(n) = t_min + (t_max-t_min) n/N
                 x ~ softmax(logits) at every position;  argmax <- argmax(logits)
                 accept the k lowest-entropy positions with  sum_{i<=k} H_i - max_{i<=k} H_i <= entropy_bound
                 canvas <- x where accepted, fresh uniform random tokens elsewhere (re-noising)
                 stop when argmax equals the last `stability_threshold` argmaxes and mean H < confidence_threshold
                 self-conditioning <- logits (processed)
  block output = the last argmax; EOS in it ends the row (tokens after it become pad); else the encoder reads it.

Randomness: each request draws from its own torch.Generator in generate's order (block start: C uniform tokens;
each step: C multinomial draws, then C re-noising tokens), and a row that has stopped draws nothing, so a request
decodes the same alone or in a batch, and a batch of one equals transformers' generate under the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rollout.canvas_trace import CanvasTrace


@dataclass(frozen=True)
class SamplerSettings:
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float | None = 0.4  # None with t_max None: no temperature processing (generate's behaviour)
    t_max: float | None = 0.8
    stability_threshold: int | None = 1  # None (or confidence None): no adaptive stopping
    confidence_threshold: float | None = 0.005

    def __post_init__(self) -> None:
        if self.max_denoising_steps < 1:
            raise ValueError(f"sampling.steps_per_block (max_denoising_steps): must be >= 1, got "
                             f"{self.max_denoising_steps}")
        if not self.entropy_bound > 0:
            raise ValueError(f"sampling.entropy_bound: must be > 0, got {self.entropy_bound}")
        if (self.t_min is None) != (self.t_max is None):
            raise ValueError("sampling: t_min and t_max are set together or not at all")
        if self.t_min is not None and not 0 <= self.t_min < self.t_max:
            raise ValueError(f"sampling: need 0 <= t_min < t_max, got {self.t_min}, {self.t_max}")

    @property
    def adaptive_stopping(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    @classmethod
    def from_generation_config(cls, gc) -> "SamplerSettings":
        """The checkpoint's DiffusionGemmaGenerationConfig, unset fields filled with transformers' defaults."""
        defaults = gc._get_default_generation_params()  # what generate itself fills unset fields with

        def pick(name):
            value = getattr(gc, name, None)
            return defaults[name] if value is None else value

        sampler = pick("sampler_config")
        return cls(max_denoising_steps=int(pick("max_denoising_steps")), entropy_bound=float(sampler.entropy_bound),
                   t_min=pick("t_min"), t_max=pick("t_max"), stability_threshold=pick("stability_threshold"),
                   confidence_threshold=pick("confidence_threshold"))

    def with_params(self, params) -> "SamplerSettings":
        """Apply a request's SamplingParams: remasking must be 'entropy_bounded' (its entropy_bound is used),
        steps_per_block sets max_denoising_steps; temperature 1 (the schedule is the sampler's temperature), no
        top-k / top-p (the sampler has none). Temperature 0 (the driver's greedy evaluation) runs the same sampler
        with the request's seed: the released model has no greedy mode (its generate always samples), and an
        argmax-only variant would be a decoder nobody published."""
        if params.remasking != "entropy_bounded":
            raise ValueError(f"sampling.remasking: DiffusionGemma decodes with its entropy-bounded sampler "
                             f"('entropy_bounded'), got {params.remasking!r}")
        if params.temperature not in (0.0, 1.0) or params.top_k or params.top_p != 1.0:
            raise ValueError("sampling.temperature: DiffusionGemma's temperature is its t_max -> t_min schedule "
                             "(generation_config.json); set temperature 1, top_k 0, top_p 1")
        steps = params.steps_per_block or self.max_denoising_steps
        return replace(self, entropy_bound=float(params.entropy_bound), max_denoising_steps=int(steps))


# ------------------------------------------------------------------------------------------ step maths
def process_logits(raw: torch.Tensor, remaining: int, max_steps: int, t_min: float | None,
                   t_max: float | None) -> torch.Tensor:
    """Logits / t(n) with generate's exact arithmetic (an int32 step tensor divided by N: float32)."""
    if t_min is None:
        return raw
    step = torch.tensor(remaining, device=raw.device, dtype=torch.int32)
    return raw / (t_min + ((t_max - t_min) * (step / max_steps)))


def token_entropy(processed: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=processed).entropy()


def entropy_accept(processed: torch.Tensor, bound: float) -> torch.Tensor:
    """(B, C) bool: the lowest-entropy positions whose entropy sum minus their maximum stays <= bound."""
    entropy = token_entropy(processed)
    ordered, order = torch.sort(entropy, dim=-1, descending=False)
    keep = torch.cumsum(ordered, dim=-1) - ordered <= bound
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


def action_logprobs(processed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(processed)[token] per position: the log-prob a token was sampled with."""
    return torch.log_softmax(processed.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


class StopRule:
    """StableAndConfidentStoppingCriteria for one row: the last `stability` argmax canvases equal the new one and
    the mean entropy of the processed logits is below `confidence`."""

    def __init__(self, stability: int, confidence: float, canvas_length: int, device):
        self.confidence = confidence
        self.history = torch.full((stability, canvas_length), -1, dtype=torch.long, device=device)

    def __call__(self, argmax: torch.Tensor, processed: torch.Tensor) -> bool:
        stable = bool((self.history == argmax[None]).all()) if self.history.shape[0] else True
        if self.history.shape[0]:
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable and bool(token_entropy(processed).mean() < self.confidence)


# ---------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodedRow:
    response: torch.Tensor  # (blocks * C,) long: the argmax canvases, pad after the first EOS
    valid_length: int  # through the first EOS
    finish_reason: str  # "eos" | "length"
    trace: CanvasTrace
    nfe: int  # decoder forward passes this row took part in while denoising


@torch.no_grad()
def decode_rows(policy, prompts: list[torch.Tensor], settings: SamplerSettings, max_new_tokens: int,
                generators: list[torch.Generator]) -> list[DecodedRow]:
    """Decode a batch of prompts (left-padded together, as generate pads a batch) with the entropy-bounded
    sampler, recording every canvas each row's steps read."""
    if len(prompts) != len(generators):
        raise ValueError("decode_rows: one generator per prompt")
    spec, device = policy.spec, policy.device
    size, length, vocab = len(prompts), spec.canvas_length, spec.vocab_size
    longest = max(int(p.numel()) for p in prompts)
    ids = torch.full((size, longest), spec.pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros((size, longest), dtype=torch.bool, device=device)
    for b, prompt in enumerate(prompts):
        ids[b, longest - prompt.numel():] = prompt.to(device)
        attn[b, longest - prompt.numel():] = True
    eos = torch.tensor(spec.eos_token_ids, device=device)
    cache = policy.new_cache()
    enc_pos = torch.arange(longest, device=device)[None]
    dec_pos = torch.arange(longest, longest + length, device=device)[None]
    running = [True] * size  # not finished by EOS
    logs = [_RowLog() for _ in range(size)]
    chunk = ids
    blocks = -(-max_new_tokens // length)
    for block in range(blocks):
        cache = policy.encode(chunk, attn, enc_pos, cache)
        canvas = torch.full((size, length), spec.pad_token_id, dtype=torch.long, device=device)
        for b in range(size):
            if running[b]:
                canvas[b] = torch.randint(0, vocab, (1, length), generator=generators[b], device=device)[0]
        masks = policy.decoder_masks(canvas, cache, torch.nn.functional.pad(attn, (0, length), value=True))
        denoising = list(running)
        stops = [StopRule(settings.stability_threshold, settings.confidence_threshold, length, device)
                 if settings.adaptive_stopping else None for _ in range(size)]
        argmax = canvas.clone()
        self_cond = None
        for remaining in range(settings.max_denoising_steps, 0, -1):
            raw = policy.denoise(canvas, self_cond, masks, cache, dec_pos)
            processed = process_logits(raw, remaining, settings.max_denoising_steps, settings.t_min, settings.t_max)
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            accept = entropy_accept(processed, settings.entropy_bound)
            new_canvas = canvas.clone()
            for b in (b for b in range(size) if denoising[b]):
                sampled = torch.multinomial(probs[b], num_samples=1, generator=generators[b]).squeeze(-1)
                noise = torch.randint(0, vocab, (1, length), generator=generators[b], device=device)[0]
                new_canvas[b] = torch.where(accept[b], sampled, noise)
                logs[b].step(canvas[b], accept[b], block, remaining,
                             action_logprobs(processed[b], sampled) * accept[b])
                argmax[b] = torch.argmax(processed[b], dim=-1)
                if stops[b] is not None and stops[b](argmax[b], processed[b]):
                    denoising[b] = False
            canvas = new_canvas
            self_cond = processed.to(policy.causal_lm.model.decoder.embed_tokens.weight.dtype)
            if not any(denoising):
                break
        for b in (b for b in range(size) if running[b]):
            out = argmax[b]
            hits = torch.isin(out, eos).nonzero()
            if hits.numel():
                first = int(hits[0])
                out = out.clone()
                out[first + 1:] = spec.pad_token_id
                logs[b].finish(out, "eos", block * length + first + 1)
                running[b] = False
            else:
                logs[b].finish(out, "length", None)
        if not any(running):
            break
        chunk = argmax.clone()
        chunk[torch.tensor([not r for r in running], device=device)] = spec.pad_token_id
        attn = torch.nn.functional.pad(attn, (0, length), value=True)
        enc_pos, dec_pos = dec_pos, dec_pos + length
    return [log.row(longest - int(p.numel()), settings) for log, p in zip(logs, prompts)]


class _RowLog:
    def __init__(self) -> None:
        self.canvases, self.accepted, self.block, self.remaining, self.logps, self.outputs = [], [], [], [], [], []
        self.reason, self.valid = "length", None

    def step(self, canvas, accepted, block, remaining, logp) -> None:
        self.canvases.append(canvas.cpu())
        self.accepted.append(accepted.cpu())
        self.block.append(block)
        self.remaining.append(remaining)
        self.logps.append(logp.float().cpu())

    def finish(self, output, reason, valid) -> None:
        self.outputs.append(output.cpu())
        self.reason, self.valid = reason, valid

    def row(self, offset: int, settings: SamplerSettings) -> DecodedRow:
        trace = CanvasTrace(torch.stack(self.canvases), torch.stack(self.accepted), torch.tensor(self.block),
                            torch.tensor(self.remaining), torch.stack(self.logps), offset,
                            settings.max_denoising_steps, settings.t_min, settings.t_max)
        trace.action_logprobs = trace.action_logprobs * trace.actions()  # last step of a block: no action
        response = torch.cat(self.outputs)
        valid = response.numel() if self.valid is None else self.valid
        return DecodedRow(response, valid, self.reason, trace, trace.num_steps)
