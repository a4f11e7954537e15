"""Block alignment (rollout/models/masks.py): SDAR/TraDo count blocks from the sequence's first token.

The reference here is a naive re-implementation of SDAR's block-diffusion `generate` (JetAstra/SDAR generate.py;
TraDo's engine decodes the same way), written for obviousness: the whole sequence is recomputed at every step,
blocks are counted from position 0 (position t is in block t // B), the mask is built from that rule alone, and
the prompt's last partial block is completed by the first response tokens. Selection follows TraDo's engine
(`jetengine_ext/engine/scheduler.py`) restricted to still-masked positions; see docs/FIDELITY.md for the two places
where the originals can pick an already-unmasked position and diffrl (deliberately) does not.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rollout.engine import TorchEngine
from rollout.models.policy import DiffusionPolicy
from rollout.remasking import REMASKING
from rollout.sampling import GenerationRequest, SamplingParams

B = 4
PROMPT_LENGTHS = tuple(range(1, 13))
MAX_TOKENS = 12


class Sharp(DiffusionPolicy):
    """The tiny SDAR policy with scaled logits (confident, so thresholds matter) and, optionally, another spec."""

    def __init__(self, base: DiffusionPolicy, scale: float = 12.0, eos_bonus: float = 0.0, **spec_changes):
        super().__init__(base.model, base.tokenizer, dataclasses.replace(base.spec, **spec_changes), base.source)
        self.scale, self.eos_bonus = scale, eos_bonus

    def logits_from_hidden(self, hidden):
        logits = super().logits_from_hidden(hidden) * self.scale
        logits[..., self.spec.eos_token_id] += self.eos_bonus
        return logits


# ------------------------------------------------------------------------------------ the naive reference
def _naive_logits(policy, seq: torch.Tensor) -> torch.Tensor:
    """Logits of every position of `seq` (one unpadded sequence), blocks from position 0, block-causal."""
    n = seq.numel()
    block = torch.tensor([t // B for t in range(n)])
    bias = torch.zeros(1, 1, n, n)
    for q in range(n):
        for k in range(n):
            if block[k] > block[q]:
                bias[0, 0, q, k] = torch.finfo(torch.float32).min
    with torch.no_grad():
        return policy.forward(seq[None], torch.arange(n)[None], bias).logits[0].float()


def _uniform_counts(steps: int) -> list[int]:
    base, extra = divmod(B, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _select(name: str, params: SamplingParams, conf, ent, logp, count: int, g) -> list[int]:
    """Indices (into the masked positions, in position order) to unmask at this step."""
    n = conf.numel()
    if name == "left_to_right":  # AR order: one token a step, whatever the count
        return [0] if n else []
    if name == "sequential":
        return list(range(min(count, n)))
    if name == "low_confidence_static":
        return torch.sort(conf, descending=True, stable=True).indices[:count].tolist()
    if name == "low_confidence_dynamic":
        above = [i for i in range(n) if conf[i] > params.threshold]
        floor = min(params.min_tokens_per_step, n)
        return above if len(above) >= floor else torch.sort(conf, descending=True, stable=True).indices[:floor].tolist()
    if name == "threshold_schedule":  # LLaDA2's generate: the schedule's count is the floor
        above = [i for i in range(n) if conf[i] > params.threshold]
        return above if len(above) >= count else torch.sort(conf, descending=True, stable=True).indices[:count].tolist()
    if name == "entropy_bounded":
        order = torch.sort(ent, stable=True).indices.tolist()
        total, take = 0.0, 0
        for i in order:
            total += float(ent[i])
            if total > params.entropy_bound:
                break
            take += 1
        return order[:max(take, min(params.min_tokens_per_step, n))]
    if name == "random":
        return torch.randperm(n, generator=g)[:min(count, n)].tolist()
    # Dream's fixed-count rules (Dream's `_sample`), if the registry has them: the largest top-1 minus top-2
    # probability, or the lowest entropy scored as sum p log(p + 1e-10).
    probs = logp.exp()
    if name == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return torch.sort(top2[:, 0] - top2[:, 1], descending=True, stable=True).indices[:count].tolist()
    if name == "entropy":
        key = (probs * torch.log(probs + 1e-10)).sum(-1)
        return torch.sort(key, descending=True, stable=True).indices[:count].tolist()
    raise AssertionError(f"no naive reference for remasking {name!r}")


def naive_sdar_generate(policy, prompt: torch.Tensor, params: SamplingParams, seed: int):
    """SDAR's block_diffusion_generate, recomputing everything: returns (response, step_map, logprobs) over the
    ceil((P + G) / B) * B - P positions it decodes."""
    mask = policy.spec.mask_token_id
    g = torch.Generator().manual_seed(seed)
    p = prompt.numel()
    total = -(-(p + params.max_tokens) // B) * B
    x = torch.cat([prompt, torch.full((total - p,), mask)])
    step_map = torch.full((total,), -1)
    logprobs = torch.zeros(total)
    counts = _uniform_counts(params.steps_per_block or B)
    step = 0
    for blk in range(p // B, total // B):
        lo, hi = blk * B, (blk + 1) * B
        for step_in_block in range(B + 1):
            masked = [t for t in range(lo, hi) if x[t] == mask]
            if not masked:
                break
            logits = _naive_logits(policy, x[:hi])[masked]
            if params.temperature > 0:
                logits = logits / params.temperature
            logp = torch.log_softmax(logits, dim=-1)
            if params.temperature > 0:  # inverse CDF, one uniform per masked position in order
                u = torch.rand(len(masked), 1, generator=g)
                cdf = logp.exp().cumsum(-1)
                tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
            else:
                tokens = logp.argmax(-1)
            chosen_logp = logp.gather(-1, tokens[:, None]).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            count = counts[step_in_block] if step_in_block < len(counts) else len(masked)
            for i in _select(params.remasking, params, chosen_logp.exp(), ent, logp, count, g):
                x[masked[i]] = tokens[i]
                step_map[masked[i]] = step
                logprobs[masked[i]] = chosen_logp[i]
            step += 1
    return x[p:], step_map[p:], logprobs[p:]


# ---------------------------------------------------------------------------------------------- decoding
CASES = [
    SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, remasking="sequential", steps_per_block=2,
                   stop_at_eos=False),
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, remasking="low_confidence_static", steps_per_block=2,
                   stop_at_eos=False),
    SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, remasking="low_confidence_static", stop_at_eos=False),
    SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, remasking="low_confidence_dynamic", threshold=0.5,
                   stop_at_eos=False),
    SamplingParams(temperature=0.7, max_tokens=MAX_TOKENS, remasking="entropy_bounded", entropy_bound=2.5,
                   stop_at_eos=False),
    SamplingParams(temperature=0.9, max_tokens=MAX_TOKENS, remasking="random", steps_per_block=2,
                   stop_at_eos=False),
    SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, remasking="threshold_schedule", threshold=0.5,
                   steps_per_block=2, stop_at_eos=False),
    SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, remasking="left_to_right", steps_per_block=2,
                   stop_at_eos=False),  # JustGRPO's AR order: steps_per_block has no say
]
SDAR_TRADO = {"sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded", "random"}
# Dream's fixed-count strategies decode block models too, when the registry has them. Dream's `origin` (transfer
# with probability 1 - s/t along Dream's full-canvas schedule) has no block-decoding meaning and is left out.
FULL_ATTENTION_ONLY = {"origin"}
CASES += [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, remasking=name, steps_per_block=2,
                         stop_at_eos=False)
          for name in sorted({"topk_margin", "entropy"} & set(REMASKING))]


def _prompts(policy, lengths=PROMPT_LENGTHS):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(10, len(policy.tokenizer), (n,), generator=g) for n in lengths]


def _decode(policy, prompts, params, kv_cache, seeds):
    requests = [GenerationRequest(p, params, seed=s, request_id=str(s)) for p, s in zip(prompts, seeds)]
    out = TorchEngine(policy, kv_cache=kv_cache).generate(requests)
    for t in out:
        t.validate()
    return out


def _assert_matches_naive(traj, naive, prompt_len):
    response, step_map, logprobs = naive
    head = prompt_len % B
    n = MAX_TOKENS - head  # diffrl stops at the last whole block within max_tokens
    assert traj.response_length == n, (prompt_len, traj.response_length)
    assert traj.response_ids.tolist() == response[:n].tolist(), prompt_len
    assert traj.step_map.tolist() == step_map[:n].tolist(), prompt_len
    assert torch.allclose(traj.logprobs, logprobs[:n], atol=1e-4), prompt_len


# MDPO's RCR masks decoded tokens again, which SDAR's generate cannot: tests/rollout/test_rcr.py checks it against
# MDPO's own loop instead.
NOT_IN_SDAR_GENERATE = {"rcr"}


def test_the_remasking_registry_is_covered():
    assert {c.remasking for c in CASES} == set(REMASKING) - FULL_ATTENTION_ONLY - NOT_IN_SDAR_GENERATE
    assert SDAR_TRADO <= set(REMASKING)


@pytest.mark.parametrize("kv_cache", ["block", "none"])
@pytest.mark.parametrize("params", CASES, ids=lambda p: f"{p.remasking}-T{p.temperature}-s{p.steps_per_block}")
def test_absolute_alignment_decodes_as_sdar_generate(tiny_policies, params, kv_cache):
    policy = Sharp(tiny_policies["sdar"])
    assert policy.spec.block_alignment == "absolute" and policy.spec.block_size == B
    prompts = _prompts(policy)
    seeds = list(range(100, 100 + len(prompts)))
    naive = [naive_sdar_generate(policy, p, params, s) for p, s in zip(prompts, seeds)]
    # Mixed prompt lengths in one padded batch (every head 0..3 at once), then each prompt alone.
    batch = _decode(policy, prompts, params, kv_cache, seeds)
    assert len(batch) == len(naive) == len(prompts) > 0
    for traj, ref, prompt in zip(batch, naive, prompts):
        _assert_matches_naive(traj, ref, prompt.numel())
    for prompt, seed, ref in zip(prompts, seeds, naive):
        _assert_matches_naive(_decode(policy, [prompt], params, kv_cache, [seed])[0], ref, prompt.numel())
    if params.remasking in ("low_confidence_dynamic", "entropy_bounded"):
        several = sum(int(torch.bincount(t.step_map).max()) > 1 for t in batch)
        assert several > 0, "the thresholds should unmask several tokens in some step"


def test_response_alignment_does_not_decode_as_sdar_generate(tiny_policies):
    """The check above can fail: decoding an SDAR model with blocks from the response start (diffrl's behaviour
    before block alignment existed) differs from SDAR's generate for every prompt length not a multiple of B."""
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, remasking="low_confidence_static",
                            stop_at_eos=False)
    absolute = Sharp(tiny_policies["sdar"])
    response = Sharp(tiny_policies["sdar"], block_alignment="response")
    prompts = _prompts(absolute)
    differing = {}
    for prompt, traj in zip(prompts, _decode(response, prompts, params, "block", [0] * len(prompts))):
        ref, _, _ = naive_sdar_generate(absolute, prompt, params, 0)
        n = MAX_TOKENS - B  # compare the tokens both produce
        differing[prompt.numel()] = int((traj.response_ids[:n] != ref[:n]).sum())
    assert all(differing[p] == 0 for p in PROMPT_LENGTHS if p % B == 0), differing
    assert all(differing[p] > 0 for p in PROMPT_LENGTHS if p % B), differing
    assert sum(differing.values()) >= 0.5 * (MAX_TOKENS - B) * sum(p % B > 0 for p in PROMPT_LENGTHS), differing


def test_a_prompt_tail_holding_eos_does_not_stop_decoding(tiny_policies):
    """SDAR's generate checks for EOS in the response only; the prompt's tail shares the first block with it."""
    policy = Sharp(tiny_policies["sdar"], eos_bonus=-1e4)  # the response itself never holds an EOS
    eos = policy.spec.eos_token_id
    prompt = torch.tensor([20, 21, 22, 23, 24, eos])  # head = 2 tokens, the EOS among them
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, remasking="low_confidence_static")
    for kv_cache in ("block", "none"):
        traj = _decode(policy, [prompt], params, kv_cache, [0])[0]
        assert traj.finish_reason == "length" and traj.response_length == MAX_TOKENS - 2
        assert traj.valid_length == traj.response_length and not bool((traj.response_ids == eos).any())


# ------------------------------------------------------------------------------------------ training layout
def _true_block_of(t: int, prompt_len: int, alignment: str) -> int:
    """The decoder's block of sequence position t, straight from each alignment's definition."""
    if alignment == "absolute":
        return t // B
    if t < prompt_len:  # response alignment: prompt blocks counted backwards from the prompt's end
        return -math.ceil((prompt_len - t) / B)
    return (t - prompt_len) // B


def _context_logprobs(policy, seq: torch.Tensor, prompt_len: int, alignment: str, rows: list[int],
                      targets: torch.Tensor) -> torch.Tensor:
    """log p(targets | seq) at rows, one forward of `seq` alone with the naive block-causal mask."""
    n = seq.numel()
    bias = torch.zeros(1, 1, n, n)
    for q in range(n):
        for k in range(n):
            if _true_block_of(k, prompt_len, alignment) > _true_block_of(q, prompt_len, alignment):
                bias[0, 0, q, k] = torch.finfo(torch.float32).min
    with torch.no_grad():
        logits = policy.forward(seq[None], torch.arange(n)[None], bias).logits[0].float()
    return torch.log_softmax(logits[rows], -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("alignment", ["absolute", "response"])
def test_training_layout_equals_each_blocks_true_context(tiny_policies, alignment):
    """score_responses through `[prompt | clean | noisy canvas]` (one padded batch) == for every decoding block, a
    separate forward of exactly what the decoder saw: the prompt, the clean earlier blocks, this block's noisy
    state (under `absolute`, the first block holds the prompt's tail, unmasked, with the response's head)."""
    policy = Sharp(tiny_policies["sdar"], scale=1.0, block_alignment=alignment)
    mask = policy.spec.mask_token_id
    g = torch.Generator().manual_seed(5)
    cases = [(1, 7), (2, 10), (5, 11), (7, 5), (8, 8), (11, 13), (3, 1)]
    prompts = [torch.randint(10, 100, (p,), generator=g) for p, _ in cases]
    responses = [torch.randint(10, 100, (n,), generator=g) for _, n in cases]
    noisy = [torch.where(torch.rand(n, generator=g) < 0.5, torch.full((n,), mask), r)
             for r, (_, n) in zip(responses, cases)]
    with torch.no_grad():
        scores = policy.score_responses(prompts, responses, noisy)
    checked_partial = 0
    assert len(prompts) == len(responses) == len(noisy) > 0
    for b, (prompt, clean, corrupted) in enumerate(zip(prompts, responses, noisy)):
        p, n = prompt.numel(), clean.numel()
        # Response positions grouped by their true block; each group scored from its own context.
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(_true_block_of(p + i, p, alignment), []).append(i)
        for blk, members in groups.items():
            block_positions = [t for t in range(p + n) if _true_block_of(t, p, alignment) == blk]
            first, last = block_positions[0], block_positions[-1]
            # The prompt, then the response: clean before this block, its noisy state inside it.
            seq = torch.cat([prompt, torch.tensor([int(clean[i]) if p + i < first else int(corrupted[i])
                                                   for i in range(last + 1 - p)], dtype=torch.long)])
            rows = [p + i for i in members]
            ref = _context_logprobs(policy, seq, p, alignment, rows, clean[members])
            got = scores.logprobs[b, members]
            assert (got - ref).abs().max().item() <= 1e-5, (alignment, p, n, blk)
            checked_partial += int(first < p)
    if alignment == "absolute":
        assert checked_partial == sum(p % B > 0 for p, _ in cases)  # blocks holding a prompt tail were checked


# ------------------------------------------------------------------------------- checkpoints and recipes
def test_alignment_defaults_saves_and_restores(tiny_model_dirs, tmp_path):
    from rollout.models.loading import load_policy, save_policy
    from rollout.models.spec import ModelLoadError
    from rollout.models.tiny import make_tiny_policy

    sdar = load_policy(tiny_model_dirs["sdar"])
    assert not (tiny_model_dirs["sdar"] / "diffrl.json").exists()  # an original-format directory
    assert sdar.spec.block_alignment == "absolute"  # SDAR/TraDo: blocks from the sequence start
    assert load_policy(tiny_model_dirs["block"]).spec.block_alignment == "response"
    assert load_policy(tiny_model_dirs["llada"]).spec.block_alignment == "response"
    # Saved with the checkpoint, restored on load; an explicit choice overrides the checkpoint's.
    forced = load_policy(tiny_model_dirs["sdar"], block_alignment="response")
    assert forced.spec.block_alignment == "response"
    assert load_policy(save_policy(forced, tmp_path / "sdar_response")).spec.block_alignment == "response"
    assert load_policy(save_policy(sdar, tmp_path / "sdar_absolute")).spec.block_alignment == "absolute"
    block_abs = make_tiny_policy("block", tmp_path / "block_abs", block_alignment="absolute")
    assert load_policy(block_abs).spec.block_alignment == "absolute"
    assert load_policy(make_tiny_policy("sdar", tmp_path / "sdar_r", block_alignment="response")).spec \
        .block_alignment == "response"
    with pytest.raises(ModelLoadError, match="block_alignment"):
        load_policy(tiny_model_dirs["llada"], block_alignment="absolute")
    with pytest.raises(ModelLoadError, match="block_alignment"):
        load_policy(tiny_model_dirs["sdar"], block_alignment="sequence")


def test_the_recipe_selects_the_alignment():
    from launch.driver_roles import _policy_fn, engine_options
    from launch.recipe import RecipeError, recipe_from_dict

    base = {"name": "t", "algorithm": "tracerl", "reward": [{"fn": "math"}], "data": {"task": "arithmetic"},
            "rollout": {"max_tokens": 16}}
    default = recipe_from_dict({**base, "model": {"tiny": "sdar"}})
    assert default.model.block_alignment is None and "block_alignment" not in engine_options(default)
    assert default.estimator.block_alignment == "model"
    chosen = recipe_from_dict({**base, "model": {"tiny": "sdar", "block_alignment": "response"},
                               "estimator": {"name": "trajectory", "block_alignment": "response"}})
    assert engine_options(chosen)["block_alignment"] == "response"
    assert _policy_fn(chosen, "/ckpt").keywords["block_alignment"] == "response"
    assert chosen.estimator.params()["block_alignment"] == "response"
    with pytest.raises(RecipeError, match="block_alignment"):
        recipe_from_dict({**base, "model": {"tiny": "llada", "block_alignment": "absolute"}})


def test_block_local_steps_follow_the_first_blocks_head():
    from rollout.trajectory import block_local_steps

    steps = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    # head 1: blocks are response positions [0, 3), [3, 7), [7, 8)
    assert block_local_steps(steps, B, head=1).tolist() == [0, 1, 2, 0, 0, 1, 2, 0]
    assert block_local_steps(steps, B).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="head"):
        block_local_steps(steps, B, head=B)
