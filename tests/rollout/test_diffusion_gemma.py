"""DiffusionGemma (transformers' DiffusionGemmaForBlockDiffusion) in diffrl: adapter forward, decoding against
transformers' own generate and step by step against transformers' own sampler classes, save/reload, the trace
record round trip."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (EntropyBoundSampler,
                                                                             EntropyBoundSamplerConfig,
                                                                             LinearTemperatureScheduleLogitsProcessor,
                                                                             StableAndConfidentStoppingCriteria)

from rollout.canvas_trace import CanvasTrace
from rollout.engine import TorchEngine
from rollout.models.families.diffusion_gemma import make_tiny_diffusion_gemma
from rollout.models.families.diffusion_gemma_engine import DiffusionGemmaEngine
from rollout.models.families.diffusion_gemma_sampler import SamplerSettings, decode_rows
from rollout.models.loading import load_policy, save_policy
from rollout.sampling import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_diffusion_gemma(tmp_path_factory.mktemp("dgemma") / "tiny", seed=3)


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_policy(tiny_dir)


def encode(policy, text):
    return torch.tensor(policy.tokenizer.encode(text))


def test_loads_onto_transformers_class_with_published_sampler(policy):
    from transformers import DiffusionGemmaForBlockDiffusion

    assert type(policy.model) is DiffusionGemmaForBlockDiffusion
    settings = SamplerSettings.from_generation_config(policy.model.generation_config)
    assert settings == SamplerSettings(48, 0.1, 0.4, 0.8, 1, 0.005)  # google/diffusiongemma-26B-A4B-it's
    assert policy.spec.kind == "diffusion_gemma" and policy.spec.block_size == 8


def test_adapter_forward_equals_transformers_forward(policy):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 100, (2, 11), generator=gen)
    canvas = torch.randint(0, policy.spec.vocab_size, (2, 8), generator=gen)
    self_cond = torch.randn(2, 8, policy.spec.vocab_size, generator=gen) * 3
    with torch.no_grad():
        for sc in (None, self_cond):
            ours = policy.logits(prompt, canvas, sc)
            theirs = policy.model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
            assert ours.shape == theirs.shape == (2, 8, policy.spec.vocab_size)
            assert (ours - theirs).abs().max() < 1e-5
    # the self-conditioning input matters (else the check above could not tell whether it was passed on)
    assert (policy.logits(prompt, canvas, self_cond) - policy.logits(prompt, canvas)).abs().max() > 1e-3


def with_eos(policy, eos: int):
    clone = type(policy)(policy.model, policy.tokenizer, replace(policy.spec, eos_token_ids=(eos,)), policy.source)
    return clone


CASES = {  # settings, transformers generate kwargs
    "published": (SamplerSettings(max_denoising_steps=5), {}),
    "wide_bound": (SamplerSettings(max_denoising_steps=5, entropy_bound=12.0),
                   {"sampler_config": EntropyBoundSamplerConfig(entropy_bound=12.0)}),
    # the tiny model's mean entropy falls from ~4.842 to ~4.82 over a canvas as t(n) falls: stops mid-canvas
    "stops_early": (SamplerSettings(max_denoising_steps=6, entropy_bound=12.0, stability_threshold=0,
                                    confidence_threshold=4.836),
                    {"sampler_config": EntropyBoundSamplerConfig(entropy_bound=12.0), "stability_threshold": 0,
                     "confidence_threshold": 4.836}),
    "other_schedule": (SamplerSettings(max_denoising_steps=7, entropy_bound=6.0, t_min=0.2, t_max=1.5),
                       {"sampler_config": EntropyBoundSamplerConfig(entropy_bound=6.0), "t_min": 0.2, "t_max": 1.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_equals_transformers_generate_token_for_token(policy, case, seed):
    settings, kwargs = CASES[case]
    prompt = encode(policy, "12+30=")
    rows = decode_rows(policy, [prompt], settings, 24, [torch.Generator().manual_seed(seed)])
    torch.manual_seed(seed)
    ref = policy.model.generate(prompt[None], max_new_tokens=24,
                                max_denoising_steps=settings.max_denoising_steps, **kwargs).sequences[0, prompt.numel():]
    assert rows[0].response.tolist() == ref.tolist()
    trace = rows[0].trace
    if case == "stops_early":
        assert trace.num_steps < 3 * settings.max_denoising_steps  # adaptive stopping did cut some block short
    if case == "wide_bound":
        assert int(trace.accepted.sum(1).max()) > 1  # several tokens accepted in one step


def test_eos_ends_the_row_like_generate(policy):
    prompt = encode(policy, "7*7=")
    settings = SamplerSettings(max_denoising_steps=4)
    free = decode_rows(policy, [prompt], settings, 32, [torch.Generator().manual_seed(5)])[0]
    eos = int(free.response[8 + 3])  # a token the second canvas emits: make it the EOS
    first = int((free.response == eos).nonzero()[0])
    row = decode_rows(with_eos(policy, eos), [prompt], settings, 32, [torch.Generator().manual_seed(5)])[0]
    torch.manual_seed(5)
    ref = policy.model.generate(prompt[None], max_new_tokens=32, max_denoising_steps=4,
                                eos_token_id=[eos]).sequences[0, prompt.numel():]
    assert row.finish_reason == "eos" and row.valid_length == first + 1
    assert row.response.tolist() == ref.tolist()  # pad after the EOS, no canvas after the EOS's canvas
    assert row.response.numel() == (first // 8 + 1) * 8


def test_batched_rows_match_transformers_sampler_step_by_step(policy):
    """A padded batch cannot replay generate's RNG stream (each request has its own generator), so each row's
    recorded steps are checked with transformers' own pieces on the recorded canvases: its forward (one-shot,
    padded like the batch), its temperature processor, its entropy-bound acceptance, its stopping criteria."""
    prompts = [encode(policy, t) for t in ("1+1=", "123+456=", "9=")]
    settings = SamplerSettings(max_denoising_steps=6, entropy_bound=12.0, stability_threshold=0,
                               confidence_threshold=4.836)
    rows = decode_rows(policy, prompts, settings, 16, [torch.Generator().manual_seed(10 + i) for i in range(3)])
    vocab = policy.spec.vocab_size
    processor = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 6)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=12.0), 8, vocab, 6)
    checked_steps = stops = 0
    for prompt, row in zip(prompts, rows):
        trace = row.trace
        offset = trace.prompt_offset
        assert offset == 8 - prompt.numel()
        prefix = torch.cat([torch.full((offset,), policy.spec.pad_token_id), prompt])
        for k in range(int(trace.block[-1]) + 1):
            steps = (trace.block == k).nonzero().flatten().tolist()
            stop = StableAndConfidentStoppingCriteria(0, 4.836)
            attn = torch.cat([torch.zeros(offset, dtype=torch.long), torch.ones(prefix.numel() - offset,
                                                                                   dtype=torch.long)])
            self_cond = None
            for j, s in enumerate(steps):
                canvas = trace.canvases[s][None]
                with torch.no_grad():
                    raw = policy.model(input_ids=prefix[None], attention_mask=attn[None], decoder_input_ids=canvas,
                                       self_conditioning_logits=self_cond,
                                       decoder_attention_mask=torch.cat([attn, torch.ones(8, dtype=torch.long)])[None]
                                       ).logits
                n = torch.tensor(int(trace.remaining[s]), dtype=torch.int32)
                assert int(trace.remaining[s]) == 6 - j  # counts down from N within each block
                processed = processor(None, raw, cur_step=n)
                sampler.accept_canvas(canvas, canvas, processed, n)
                assert torch.equal(sampler.accepted_token_mask[0], trace.accepted[s])
                if j + 1 < len(steps):  # the accepted tokens are the next canvas's; their recorded log-probs
                    nxt = trace.canvases[s + 1]
                    want = torch.log_softmax(processed[0], -1).gather(-1, nxt[:, None]).squeeze(-1)
                    got = trace.action_logprobs[s]
                    assert torch.allclose(got[trace.accepted[s]], want[trace.accepted[s]], atol=1e-5)
                    assert bool((got[~trace.accepted[s]] == 0).all())
                argmax = processed.argmax(-1)
                stopped = bool(stop(argmax, processed)[0])
                # the row's canvas ends exactly when transformers' criteria fire, or after N steps
                last = j == len(steps) - 1
                assert stopped == last or (last and len(steps) == 6 and not stopped)
                stops += stopped
                self_cond = processed
                checked_steps += 1
            assert torch.equal(row.response[k * 8:(k + 1) * 8], argmax[0]) or row.finish_reason == "eos"
            prefix = torch.cat([prefix, argmax[0]])
    assert checked_steps >= 6 and stops >= 1


def test_engine_row_decodes_the_same_alone_and_in_a_batch(tiny_dir):
    engine = TorchEngine.from_dir(tiny_dir)
    assert isinstance(engine, DiffusionGemmaEngine)
    tok = engine.policy.tokenizer
    params = SamplingParams(max_tokens=16, remasking="entropy_bounded", entropy_bound=12.0, steps_per_block=3)
    reqs = [GenerationRequest(tok.encode(t), params, seed=i, request_id=f"r{i}")
            for i, t in enumerate(["1+1=", "12+30=", "7="])]
    batch = engine.generate(reqs)
    alone = engine.generate([reqs[1]])[0]
    assert torch.equal(alone.response_ids, batch[1].response_ids)
    assert torch.equal(alone.canvas_trace.canvases, batch[1].canvas_trace.canvases)
    for traj in batch:
        traj.validate()
        trace = traj.canvas_trace
        # per position: the summed action log-probs (the estimator's per-token quantity)
        per_block = [(trace.action_logprobs[trace.block == k]).sum(0) for k in range(2)]
        assert torch.allclose(traj.logprobs, torch.cat(per_block))
    # temperature 0 (the driver's greedy evaluation) runs the released sampler with the request's seed
    greedy = engine.generate([GenerationRequest(tok.encode("12+30="), replace(params, temperature=0.0), seed=1)])[0]
    assert torch.equal(greedy.response_ids, batch[1].response_ids)
    bad = engine.generate([GenerationRequest(tok.encode("1="), SamplingParams(max_tokens=16), seed=0)])[0]
    assert bad.finish_reason.startswith("error: ") and "entropy_bounded" in bad.finish_reason


def test_save_reload_identical_logits(policy, tmp_path):
    saved = save_policy(policy, tmp_path / "copy")
    again = load_policy(saved)
    assert again.spec == policy.spec
    assert again.model.generation_config.t_min == 0.4
    prompt = encode(policy, "3+4=")[None]
    canvas = torch.randint(0, policy.spec.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(policy.logits(prompt, canvas), again.logits(prompt, canvas))


def test_trace_round_trips_through_bytes(policy):
    row = decode_rows(policy, [encode(policy, "5-2=")], SamplerSettings(max_denoising_steps=3), 16,
                      [torch.Generator().manual_seed(2)])[0]
    back = CanvasTrace.from_bytes(row.trace.to_bytes())
    for name in ("canvases", "accepted", "block", "remaining", "action_logprobs"):
        assert torch.equal(getattr(back, name), getattr(row.trace, name)), name
    assert (back.prompt_offset, back.max_denoising_steps, back.t_min, back.t_max) == (0, 3, 0.4, 0.8)
    with pytest.raises(ValueError, match="response length"):
        back.validate(24)
