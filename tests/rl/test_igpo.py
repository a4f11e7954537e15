"""IGPO: pre-filled (inpainted) response positions in the engine, their exclusion from the loss, the hints, the
group rescue and the reference-trace column.

- engine: at every denoising step of every decoder a pre-filled position is never a query (never sampled) and
  keeps its token (never remasked); the rest of the canvas decodes as a naive left-to-right loop that sees the
  hints (full attention: later blocks' hints too); a hint past an EOS block is cut with the response;
- learner: pre-filled tokens carry zero weight (changing them leaves the update bitwise unchanged); the loss equals
  a per-sample re-implementation of d1's objective over the tokens the policy chose; on-policy ratio 1, clip 0;
- inpainting and group rescue against naive rules.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import rollout.decoding.block as block_decoder
import rollout.decoding.full as full_decoder
import rollout.decoding.reference as reference_decoder
from launch.data import DataError, Prompt
from launch.igpo import check_reference_traces, reference_trace, rescue_groups
from rl.algorithms import PolicyBatch, PolicyEstimates, compute_loss
from rl.estimators.base import EstimatorInput, token_mask_of
from rl.inpainting import (InpaintConfig, groups_to_inpaint, inpaint_canvas, place_chunks, replacements,
                           trace_chunks)
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rl.store import TrajectoryStore, read_store
from rollout.engine import TorchEngine
from rollout.models.masks import sequence_bias
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.trajectory import PREFILLED

DECODERS = [("block", "block"), ("sdar", "block"), ("sdar", "none"), ("llada", "none"), ("llada", "prefix"),
            ("dream", "none")]


@pytest.fixture(scope="module")
def policies(tiny_model_dirs):
    from rollout.models.loading import load_policy

    return {kind: load_policy(path, block_size=None if kind in ("block", "sdar") else 4)
            for kind, path in tiny_model_dirs.items()}


def hint(length: int, seed: int) -> torch.Tensor:
    """Random hint: ~40% of positions pre-filled, a whole block (positions 4-7) among them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 80, (length,), generator=g)
    on = torch.rand(length, generator=g) < 0.4
    on[4:8] = True
    return torch.where(on, ids, torch.full_like(ids, -1))


def requests_with_hints(remasking="low_confidence_static", max_tokens=12, stop_at_eos=False, **extra):
    sampling = SamplingParams(temperature=1.1, max_tokens=max_tokens, remasking=remasking, stop_at_eos=stop_at_eos,
                              **extra)
    g = torch.Generator().manual_seed(5)
    return [GenerationRequest(torch.randint(10, 90, (n,), generator=g), sampling, seed=11 + i, request_id=f"h{i}",
                              prefill=hint(max_tokens, i) if i != 1 else None)  # one row without hints
            for i, n in enumerate((3, 6, 5))]


@pytest.mark.parametrize("kind, cache", DECODERS, ids=[f"{k}-{c}" for k, c in DECODERS])
def test_prefilled_positions_are_never_sampled_nor_remasked(policies, kind, cache, monkeypatch):
    policy = policies[kind]
    requests = requests_with_hints()
    steps = []

    def watched(original):
        def denoise(rows, logits, view):
            for r, row in enumerate(view.rows):
                if row.prefilled is None:
                    continue
                canvas = view.idx[r]
                fixed = row.prefilled.to(canvas.device)[canvas]
                assert not bool(view.masked[r][fixed].any()), "a pre-filled position was queried"
            out = original(rows, logits, view)
            for row in view.rows:
                if row.prefilled is not None:
                    where = row.prefilled.nonzero().squeeze(1)
                    want = row.request.prefill[where - row.head]
                    assert torch.equal(row.tokens[where].cpu(), want), "a pre-filled token changed"
            steps.append(1)
            return out
        return denoise

    for module in (block_decoder, full_decoder, reference_decoder):
        monkeypatch.setattr(module, "denoise_rows", watched(module.denoise_rows))
    trajectories = TorchEngine(policy, kv_cache=cache).generate(requests)
    assert steps, "no denoising step ran"
    for req, traj in zip(requests, trajectories, strict=True):
        assert traj.finish_reason in ("eos", "length"), traj.finish_reason
        traj.validate()
        if req.prefill is None:
            assert traj.prefilled is None
            continue
        # response position r is prefill[r] (SDAR: after the prompt's tail in block 0; what passes the canvas
        # end, max_tokens - head, is dropped)
        want = req.prefill[:traj.response_length]
        on = want >= 0
        assert torch.equal(traj.prefilled, on)
        assert torch.equal(traj.response_ids[on], want[on])
        assert bool((traj.step_map[on] == PREFILLED).all()) and bool((traj.step_map[~on] >= 0).all())
        assert bool((traj.logprobs[on] == 0).all())


def test_without_hints_decoding_is_unchanged(policies):
    """prefill=None and a hint with no pre-filled position decode bitwise alike (the pinned decoding tests check
    prefill=None against the recorded outputs)."""
    policy = policies["sdar"]
    plain = requests_with_hints()
    empty = [GenerationRequest(r.prompt_ids, r.sampling, seed=r.seed, request_id=r.request_id,
                               prefill=torch.full((12,), -1)) for r in plain]
    a, b = TorchEngine(policy, kv_cache="block").generate(plain[1:2]), \
        TorchEngine(policy, kv_cache="block").generate(empty[1:2])
    assert torch.equal(a[0].response_ids, b[0].response_ids) and torch.equal(a[0].logprobs, b[0].logprobs)


def naive_ar_with_hint(policy, prompt, prefill, length, seed, temperature):
    """Left to right over the positions the hint leaves free; each from one forward over the whole sequence
    [prompt | canvas] where the canvas holds the decoded tokens, the hint everywhere, masks elsewhere."""
    spec = policy.spec
    p, bs = prompt.numel(), spec.block_size
    canvas = torch.where(prefill >= 0, prefill, torch.full_like(prefill, spec.mask_token_id))[:length]
    decoded = (prefill >= 0)[:length].clone()  # not `canvas != mask`: a random model may sample the mask id
    gen = torch.Generator().manual_seed(seed)
    logps = torch.zeros(length)
    for t in range(length):
        if prefill[t] >= 0:
            continue
        seq = torch.cat([prompt, canvas])
        bias = sequence_bias(p, length, bs, full=not spec.is_block, alignment="response")
        with torch.no_grad():
            logits = policy.forward(seq[None], torch.arange(seq.numel())[None], bias).logits[0]
        logp = torch.log_softmax(logits[p + t - int(spec.logits_shift)].float() / temperature, -1)
        block = slice(t - t % bs, t - t % bs + bs)
        masked = int((~decoded[block]).sum())
        u = torch.rand(masked, 1, generator=gen)[0, 0].double()
        cdf = logp.double().exp().cumsum(-1)
        canvas[t] = int((cdf <= u * cdf[-1]).sum())
        logps[t] = logp[canvas[t]]
        decoded[t] = True
    return canvas, logps


@pytest.mark.parametrize("kind, cache", [("block", "block"), ("llada", "none"), ("dream", "none")])
def test_the_rest_of_the_canvas_decodes_as_usual(policies, kind, cache):
    policy = policies[kind]
    requests = [r for r in requests_with_hints(remasking="left_to_right") if r.prefill is not None]
    trajectories = TorchEngine(policy, kv_cache=cache).generate(requests)
    for req, traj in zip(requests, trajectories, strict=True):
        want, logps = naive_ar_with_hint(policy, req.prompt_ids, req.prefill, 12, req.seed, 1.1)
        assert traj.response_ids.tolist() == want.tolist()
        assert (traj.logprobs - logps).abs().max().item() <= 1e-5  # the hints were in the context


def test_a_hint_past_the_eos_block_is_cut_with_the_response(policies):
    policy = policies["block"]
    eos = policy.spec.eos_token_id
    prefill = torch.full((12,), -1)
    prefill[1], prefill[9] = eos, 42  # EOS in block 0: decoding stops there; the hint in block 2 is never reached
    req = GenerationRequest(torch.tensor([11, 12, 13]), SamplingParams(max_tokens=12, remasking="left_to_right"),
                            seed=3, request_id="eos", prefill=prefill)
    traj = TorchEngine(policy, kv_cache="block").generate([req])[0]
    assert traj.finish_reason == "eos" and traj.response_length == 4 and traj.valid_length == 2
    assert traj.prefilled.tolist() == [False, True, False, False]
    traj.validate()


def test_bad_hints_fail_per_request(policies):
    policy = policies["block"]
    sampling = SamplingParams(max_tokens=8)
    bad = [GenerationRequest([11, 12], sampling, seed=1, request_id="long", prefill=torch.full((9,), -1)),
           GenerationRequest([11, 12], sampling, seed=1, request_id="mask",
                             prefill=torch.tensor([policy.spec.mask_token_id])),
           GenerationRequest([11, 12], sampling, seed=1, request_id="ok", prefill=torch.tensor([-1, 30]))]
    out = TorchEngine(policy).generate(bad)
    assert out[0].finish_reason.startswith("error: prefill must be 1-D")
    assert out[1].finish_reason.startswith("error: prefill contains the mask token")
    assert out[2].finish_reason in ("eos", "length") and out[2].response_ids[1] == 30


# ------------------------------------------------------------------------------------------------ learner
def hinted_samples(policy, advantages=(1.0, -1.0, 0.5)):
    requests = [r for r in requests_with_hints(max_tokens=8)]
    trajectories = TorchEngine(policy).generate(requests)
    return [ScoredSample(t, advantage=a, keep=True, reward=a) for t, a in zip(trajectories, advantages)]


def test_prefilled_tokens_carry_zero_weight_in_the_update(tiny_model_dirs):
    """The one-step scoring forward masks every response position, so a hint token is only ever a target: if it
    carried weight, changing it would change the update. It does not, bit for bit; changing a token the policy
    chose does."""
    from rollout.models.loading import load_policy

    def update(change):
        policy = load_policy(tiny_model_dirs["llada"], block_size=4)
        samples = hinted_samples(policy)
        for s in samples:
            traj = s.trajectory
            if traj.prefilled is not None and change is not None:
                where = traj.prefilled if change == "hint" else ~traj.prefilled
                traj.response_ids = torch.where(where, (traj.response_ids + 7) % 90 + 10, traj.response_ids)
        assert any(s.trajectory.prefilled is not None and bool(s.trajectory.prefilled.any()) for s in samples)
        learner = Learner(policy, LearnerConfig(algorithm="igpo", estimator="one_step", estimator_params={"p_mask": 0},
                                                mu=1, micro_batch_size=3, optim=OptimConfig(lr=1e-3)))
        m = learner.update(samples)
        return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, m

    base, m = update(None)
    hints, _ = update("hint")
    chosen, _ = update("chosen")
    assert all(torch.equal(base[k], hints[k]) for k in base)
    assert any(not torch.equal(base[k], chosen[k]) for k in base)
    assert m["ratio_mean"] == 1.0 and m["clipfrac"] == 0.0 and m["optimizer_steps"] == 1
    assert math.isfinite(m["grad_norm"]) and m["kl"] == 0.0


def naive_igpo_loss(logp, old, ref, adv, counted, eps=0.2, beta=0.01) -> float:
    """d1's objective over the tokens the policy chose: sum_i sum_{t counted} [-min(rho A, clip(rho) A)
    + beta (exp(ref - logp) - (ref - logp) - 1)] / number of counted tokens."""
    total, n = 0.0, 0
    for i in range(len(adv)):
        for t in range(len(logp[i])):
            if not counted[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            d = ref[i][t] - logp[i][t]
            total += -min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i]) + beta * (math.exp(d) - d - 1)
            n += 1
    return total / n


def test_logp_mismatch_leaves_hints_out():
    from rl.learner_batch import logp_gaps

    gaps = logp_gaps([torch.tensor([-1.0, -2.0, -3.0])], [torch.tensor([-1.5, 0.0, -3.0])], [3],
                     [torch.tensor([False, True, False])])
    assert gaps.tolist() == [0.5, 0.0]


def test_loss_equals_naive_d1_objective_without_hint_tokens():
    g = torch.Generator().manual_seed(2)
    b, length = 4, 10
    frozen = [torch.rand(length, generator=g) < 0.3 for _ in range(b)]
    frozen[1] = None  # a sample without hints
    inp = EstimatorInput([torch.tensor([1])] * b, [torch.zeros(length, dtype=torch.long)] * b, list("abcd"),
                         [length, 7, length, 5], frozen=frozen)
    mask = token_mask_of(inp)
    logp = (torch.randn(b, length, generator=g) - 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, length, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(b, length, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0])
    loss, metrics = compute_loss("igpo", PolicyBatch(advantages=adv, token_mask=mask),
                                 PolicyEstimates(logp=logp, old_logp=old, ref_logp=ref))
    counted = [[t < inp.valid_length(i) and not (frozen[i] is not None and bool(frozen[i][t]))
                for t in range(length)] for i in range(b)]
    assert loss.item() == pytest.approx(naive_igpo_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                                        counted), rel=1e-5)
    loss.backward()
    for i in range(b):
        if frozen[i] is not None:
            assert bool((logp.grad[i][frozen[i]] == 0).all())  # hint tokens: zero weight
    assert 0 < float(metrics["clipfrac"]) < 1


# ------------------------------------------------------------------------------------------------ hints
def test_group_selection_equals_naive_rules():
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        n, groups = 3, 5
        rewards = torch.randint(0, 3, (n * groups,), generator=g).float().div(2).tolist()
        correct = [r == 1.0 for r in rewards]
        ids = [i // n for i in range(n * groups)]
        naive_wrong = [k for k in range(groups) if not any(correct[k * n:(k + 1) * n])]
        naive_flat = [k for k in range(groups) if len(set(rewards[k * n:(k + 1) * n])) == 1]
        assert groups_to_inpaint(rewards, correct, ids, "all_wrong") == naive_wrong
        assert groups_to_inpaint(rewards, correct, ids, "zero_advantage") == naive_flat


def test_replacements_take_correct_hinted_samples_into_the_first_positions():
    gen = torch.Generator().manual_seed(0)
    assert replacements([False, True, False, True], 4, gen) == [(0, 1), (1, 3)]
    assert replacements([False] * 4, 4, gen) == []
    picked = replacements([True] * 6, 4, gen)
    assert [d for d, _ in picked] == [0, 1, 2, 3] and len({s for _, s in picked}) == 4


def test_hint_of_one_sample():
    cfg = InpaintConfig(min_chunk=2, max_chunk=3, free_tail=4)
    trace = list(range(100, 120))  # 20 tokens
    for seed in range(20):
        chunks = trace_chunks(20, cfg, torch.Generator().manual_seed(seed))
        assert chunks[0][0] == 0 and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(2 <= e - s <= 3 for s, e in chunks) and 20 - chunks[-1][1] < 2
        out = inpaint_canvas(trace, 32, 0.5, cfg, torch.Generator().manual_seed(seed))
        shown = out[out >= 0].tolist()
        assert shown and bool((out[28:] == -1).all())  # the free tail
        assert shown == sorted(shown) and set(shown) <= set(trace)  # trace order kept, tokens of the trace
        assert trace[chunks[-1][0]:chunks[-1][1]] == shown[-(chunks[-1][1] - chunks[-1][0]):]  # last chunk shown
        revealed = len(chunks) - int(len(chunks) * 0.5) + (1 if int(len(chunks) * 0.5) else 0)
        assert len(shown) <= sum(e - s for s, e in chunks) and revealed >= 1
    # spacing stretched by the scale, capped, cut at the limit
    assert place_chunks([(0, 2), (4, 6), (10, 12)], 1.5, 100, 100) == [(0, 2), (5, 7), (13, 15)]
    assert place_chunks([(0, 2), (4, 6), (10, 12)], 1.5, 100, 2) == [(0, 2), (4, 6), (8, 10)]
    assert place_chunks([(0, 2), (4, 6), (10, 12)], 1.5, 14, 100) == [(0, 2), (5, 7), (13, 14)]
    assert place_chunks([(0, 2), (4, 6), (10, 12)], 1.5, 6, 100) == [(0, 2), (5, 6)]


def test_rescue_swaps_correct_hinted_samples_into_all_wrong_groups(policies):
    policy = policies["llada"]
    engine = TorchEngine(policy)
    n = 3
    sampling = SamplingParams(temperature=1.0, max_tokens=12)
    prompts = [Prompt(k, (11 + k, 12, 13), f"q{k}", str(k), {"reference_trace": "abcdefgh"}) for k in range(3)]
    requests = [GenerationRequest(list(p.prompt_ids), sampling, seed=10 * k + j, request_id=f"p{k}-s{j}")
                for k, p in enumerate(prompts) for j in range(n)]
    samples = [ScoredSample(t, prompt_index=k // n, sample_index=k % n)
               for k, t in enumerate(engine.generate(requests))]
    for k, s in enumerate(samples):  # group 1 has a correct answer: left alone
        s.reward, s.reason = (1.0, "correct") if k == 4 else (0.0, "wrong")
    before = [s.trajectory for s in samples]

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [20 + ord(c) - ord("a") for c in text]}

    def score(hinted_prompts, hinted):  # every other hinted sample is correct
        assert len(hinted_prompts) == len(hinted)
        for k, s in enumerate(hinted):
            s.reward, s.reason = (1.0, "correct") if k % 2 == 0 else (0.0, "wrong")

    cfg = InpaintConfig(min_chunk=2, max_chunk=3, free_tail=2, max_replacements=1)
    metrics = rescue_groups(prompts, samples, requests, n=n, cfg=cfg, field="reference_trace", seed=0,
                            tokenizer=Tok(), generate=engine.generate, score=score)
    assert metrics["igpo/groups_triggered"] == 2 and metrics["igpo/groups_rescued"] == 2
    assert metrics["igpo/samples_replaced"] == 2  # max_replacements 1 per group
    for g in (0, 2):
        first = samples[g * n]
        assert first.reason == "correct" and first.trajectory.prefilled is not None
        assert first.trajectory.request_id.endswith("-igpo") and first.sample_index == 0
        assert bool(first.trajectory.prefilled.any())
        assert samples[g * n + 1].trajectory is before[g * n + 1] and samples[g * n + 2].trajectory is before[g * n + 2]
    assert all(samples[k].trajectory is before[k] for k in range(n, 2 * n))


def test_reference_trace_column(tmp_path):
    good = Prompt(0, (1,), "q", "4", {"reference_trace": "2+2=4"})
    assert reference_trace(good, "reference_trace") == "2+2=4" and reference_trace(good, "answer") == "4"
    assert reference_trace(Prompt(1, (1,), "q", "4", {}), "reference_trace") is None
    with pytest.raises(DataError, match="data row 7: column 'reference_trace'"):
        check_reference_traces([good, Prompt(7, (1,), "q", "4", {"reference_trace": ["a"]})], "reference_trace")
    with pytest.raises(DataError, match="no data row has a 'trace' column"):
        check_reference_traces([good], "trace")


def test_store_round_trips_prefilled_positions(tmp_path, policies):
    samples = hinted_samples(policies["block"])
    store = TrajectoryStore(tmp_path)
    store.add(1, samples)
    rows = read_store(tmp_path)
    for row, s in zip(rows, samples, strict=True):
        want = None if s.trajectory.prefilled is None else s.trajectory.prefilled.nonzero().reshape(-1).tolist()
        assert row["prefilled"] == want
    assert any(r["prefilled"] for r in rows) and any(r["prefilled"] is None for r in rows)


def test_entropy_filter_keeps_the_highest_entropy_hints():
    from rl.inpainting import thaw_high_entropy

    hints = torch.tensor([True, False, True, True, True, True, False, True, True, True, True, True])
    entropy = torch.tensor([0.1, 9.0, 0.5, 3.0, 0.2, 2.0, 8.0, 0.3, 1.0, 4.0, 0.0, 0.4])
    left = thaw_high_entropy(hints, entropy, 0.2)  # 10 hints: the int(10 * 0.2) = 2 of highest entropy (4.0, 3.0)
    assert (hints & ~left).nonzero().squeeze(1).tolist() == [3, 9] and not bool((left & ~hints).any())
    assert thaw_high_entropy(hints, entropy, 0.01).logical_xor(hints).sum() == 1  # at least one
    assert torch.equal(thaw_high_entropy(hints, entropy, 0.0), hints)


def test_learner_trains_the_entropy_filtered_share_of_hints(tiny_model_dirs):
    """hint_entropy_keep 0.2 (IGPO's code): exactly max(1, int(0.2 n)) hint tokens of each hinted sample join the
    counted tokens; 0 (default): none."""
    from rollout.models.loading import load_policy

    def tokens(keep):
        policy = load_policy(tiny_model_dirs["llada"], block_size=4)
        samples = hinted_samples(policy)
        learner = Learner(policy, LearnerConfig(algorithm="igpo", estimator="one_step", mu=1, micro_batch_size=3,
                                                estimator_params={"p_mask": 0}, loss={"hint_entropy_keep": keep},
                                                optim=OptimConfig(lr=1e-4)))
        m = learner.update(samples)
        assert m["ratio_mean"] == 1.0 and m["clipfrac"] == 0.0
        return m["num_tokens"], samples  # counted tokens of the one micro-batch (all 3 samples)

    base, samples = tokens(0.0)
    kept, _ = tokens(0.2)
    hinted = [int(s.trajectory.prefilled.sum()) for s in samples if s.trajectory.prefilled is not None]
    assert hinted and kept - base == pytest.approx(sum(max(1, int(0.2 * n)) for n in hinted if n))


def test_recipe_rules_for_igpo():
    from launch.recipe import load_recipe
    from launch.recipe_io import RecipeError

    base = Path(__file__).resolve().parents[2] / "recipes" / "tiny-igpo.yaml"
    assert load_recipe(base).algorithm.inpaint.reference_field == "answer"
    with pytest.raises(RecipeError, match="algorithm.inpaint.ratio_low: 0.7 > algorithm.inpaint.ratio_high 0.6"):
        load_recipe(base, overrides=["algorithm.inpaint.ratio_low=0.7"])
    with pytest.raises(RecipeError, match="estimator.name: igpo needs"):
        load_recipe(base, overrides=["estimator.name=trajectory"])
