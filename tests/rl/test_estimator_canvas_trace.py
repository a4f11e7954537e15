"""The canvas_trace estimator (DiffusionGemma): recomputes the rollout's log-probs, equals a naive replay written
with transformers' own forward and temperature processor (values and gradients), and trains through the Learner
with TraceRL and GDPO's sequence loss."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import LinearTemperatureScheduleLogitsProcessor

from rl.estimators import get_estimator
from rl.estimators.base import EstimatorInput
from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rl.sample import ScoredSample
from rollout.models.families.diffusion_gemma import make_tiny_diffusion_gemma
from rollout.models.families.diffusion_gemma_engine import DiffusionGemmaEngine
from rollout.models.loading import load_policy
from rollout.sampling import GenerationRequest, SamplingParams

PROMPTS = ("1+1=", "123+456=", "9=")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_diffusion_gemma(tmp_path_factory.mktemp("dgemma") / "tiny", seed=4)


def rollouts(policy, *, bound=12.0, steps=4, max_tokens=16, prompts=PROMPTS):
    engine = DiffusionGemmaEngine(policy)
    params = SamplingParams(max_tokens=max_tokens, remasking="entropy_bounded", entropy_bound=bound,
                            steps_per_block=steps)
    tok = policy.tokenizer
    return engine.generate([GenerationRequest(tok.encode(t), params, seed=7 + i, request_id=f"r{i}")
                            for i, t in enumerate(prompts)])


def estimator_input(trajs) -> EstimatorInput:
    return EstimatorInput([t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                          [t.request_id for t in trajs], [t.valid_length for t in trajs], [t.step_map for t in trajs],
                          trajs[0].block_size, [t.canvas_trace for t in trajs])


def naive_seq_logp(policy, traj) -> torch.Tensor:
    """Sum over the trace's actions of log softmax(t(n)-processed logits)[token], every step a one-shot
    transformers forward over (padded prompt + earlier canvases) and the recorded canvas, self-conditioned on the
    previous step's processed logits (detached)."""
    trace, length = traj.canvas_trace, traj.block_size
    processor = LinearTemperatureScheduleLogitsProcessor(trace.t_min, trace.t_max, trace.max_denoising_steps)
    pad = policy.spec.pad_token_id
    prefix = torch.cat([torch.full((trace.prompt_offset,), pad), traj.prompt_ids])
    valid = torch.cat([torch.zeros(trace.prompt_offset, dtype=torch.long), torch.ones(traj.prompt_ids.numel(),
                                                                                      dtype=torch.long)])
    total = torch.zeros(())
    for k in range(int(trace.block[-1]) + 1):
        steps = (trace.block == k).nonzero().flatten().tolist()
        self_cond = None
        for j, s in enumerate(steps[:-1]):  # the last step of a canvas takes no action
            logits = policy.model(input_ids=prefix[None], attention_mask=valid[None],
                                  decoder_input_ids=trace.canvases[s][None], self_conditioning_logits=self_cond,
                                  decoder_attention_mask=torch.cat([valid, torch.ones(length, dtype=torch.long)])[None]
                                  ).logits
            processed = processor(None, logits, cur_step=torch.tensor(int(trace.remaining[s]), dtype=torch.int32))
            logp = torch.log_softmax(processed[0], -1)
            for i in trace.accepted[s].nonzero().flatten().tolist():
                total = total + logp[i, int(trace.canvases[s + 1, i])]
            self_cond = processed.detach()
        prefix = torch.cat([prefix, traj.response_ids[k * length:(k + 1) * length]])
        valid = torch.cat([valid, torch.ones(length, dtype=torch.long)])
    return total


def test_recomputes_rollout_logprobs_and_equals_naive_replay(tiny_dir):
    policy = load_policy(tiny_dir)
    trajs = rollouts(policy)
    assert {t.canvas_trace.prompt_offset for t in trajs} == {0, 4, 6}  # padded batch: offsets must be honoured
    assert any(int(t.canvas_trace.actions().sum(1).max()) > 1 for t in trajs)  # several actions in one step
    with torch.no_grad():
        est = get_estimator("canvas_trace")(policy, estimator_input(trajs), return_entropy=True)
    acted = est.token_logp != 0
    assert bool((est.entropy[acted] > 0).all()) and bool((est.entropy[~acted] == 0).all())
    for b, traj in enumerate(trajs):
        assert (est.token_logp[b, :traj.response_length] - traj.logprobs).abs().max() < 1e-5
        with torch.no_grad():
            naive = naive_seq_logp(policy, traj)
        assert abs(float(est.token_logp[b].sum()) - float(naive)) < 1e-4  # every action (seq_logp: through EOS)
        assert float(naive) < -1.0  # a real sum of log-probs, not an empty one
    steps = sum(t.canvas_trace.num_steps for t in trajs)
    blocks = sum(int(t.canvas_trace.block[-1]) + 1 for t in trajs)
    assert est.forwards == blocks + (steps - blocks)  # an encoder pass per canvas, a decoder pass per step but
    #                                                   each canvas's last (it takes no action)


def test_gradient_equals_naive_replay_gradient(tiny_dir):
    policy = load_policy(tiny_dir)
    traj = rollouts(policy, prompts=PROMPTS[1:2])[0]
    shared = policy.model.model.decoder.layers[0].self_attn.q_proj.weight  # tied: encoder and decoder
    own = policy.model.model.decoder.self_conditioning.down_proj.weight  # the decoder's self-conditioning block
    assert shared is policy.model.model.encoder.language_model.layers[0].self_attn.q_proj.weight
    grads = []
    for fn in (lambda: get_estimator("canvas_trace")(policy, estimator_input([traj])).seq_logp.sum(),
               lambda: naive_seq_logp(policy, traj)):
        policy.model.zero_grad()
        fn().backward()
        grads.append((shared.grad.clone(), own.grad.clone()))
    for mine, naive in zip(*grads):
        assert naive.abs().max() > 0
        assert torch.allclose(mine, naive, rtol=1e-3, atol=1e-5)


def test_refuses_without_traces_and_with_a_temperature(tiny_dir):
    policy = load_policy(tiny_dir)
    trajs = rollouts(policy, steps=2, max_tokens=8, prompts=PROMPTS[:1])
    inp = estimator_input(trajs)
    with pytest.raises(ValueError, match="temperature"):
        get_estimator("canvas_trace")(policy, inp, temperature=0.7)
    inp.canvas_traces = None
    with pytest.raises(ValueError, match="canvas traces"):
        get_estimator("canvas_trace")(policy, inp)


@pytest.mark.parametrize("algorithm", ["tracerl", "gdpo"])
def test_learner_update_on_policy(tiny_dir, algorithm):
    policy = load_policy(tiny_dir)
    trajs = rollouts(policy, prompts=PROMPTS * 2)
    for i, t in enumerate(trajs):
        t.request_id = f"s{i}"
    samples = [ScoredSample(t, advantage=(1.0 if i % 2 else -1.0), reward=float(i % 2)) for i, t in enumerate(trajs)]
    before = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    learner = Learner(policy, LearnerConfig(algorithm=algorithm, estimator="canvas_trace", mu=1, micro_batch_size=3,
                                            log_mismatch=True, optim=OptimConfig(lr=1e-3)))
    m = learner.update(samples)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["clipfrac"] == 0.0
    assert m["logp_mismatch_max"] < 1e-5  # the learner recomputes every rollout log-prob
    assert all(math.isfinite(v) for v in m.values()), m
    changed = [k for k, v in policy.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and m["optimizer_steps"] == 1


def test_positive_advantage_raises_sequence_likelihood(tiny_dir):
    policy = load_policy(tiny_dir)
    traj = rollouts(policy, prompts=PROMPTS[:1])[0]
    inp = estimator_input([traj])
    with torch.no_grad():
        before = float(get_estimator("canvas_trace")(policy, inp).seq_logp[0])
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="canvas_trace", mu=1,
                                            loss={"beta": 0.0}, optim=OptimConfig(lr=1e-3)))
    learner.update([ScoredSample(traj, advantage=1.0, reward=1.0)])
    with torch.no_grad():
        after = float(get_estimator("canvas_trace")(policy, inp).seq_logp[0])
    assert after > before


def test_kl_to_a_frozen_reference_copy(tiny_dir):
    policy = load_policy(tiny_dir)
    trajs = rollouts(policy, prompts=PROMPTS[:2])
    samples = [ScoredSample(t, advantage=(1.0 if i else -1.0), reward=float(i)) for i, t in enumerate(trajs)]
    learner = Learner(policy, LearnerConfig(algorithm="gdpo", estimator="canvas_trace", mu=1, micro_batch_size=2,
                                            loss={"beta": 0.04, "kl_reference": "ref"}, optim=OptimConfig(lr=1e-3)))
    m = learner.update(samples)
    assert m["forwards_ref"] > 0 and m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert type(learner.ref_policy) is type(policy) and learner.ref_policy.model is not policy.model


def test_self_conditioning_gradient_option_backpropagates_through_the_chain(tiny_dir):
    policy = load_policy(tiny_dir)
    traj = rollouts(policy, prompts=PROMPTS[:1], steps=3, max_tokens=8)[0]
    # a weight the first step's logits depend on (the self-conditioning block reads zeros at a canvas's first step)
    own = policy.model.model.decoder.layers[1].self_attn.o_proj.weight
    grads = []
    for through in (False, True):
        policy.model.zero_grad()
        est = get_estimator("canvas_trace")(policy, estimator_input([traj]), self_conditioning_grad=through)
        est.token_logp.sum().backward()
        grads.append(own.grad.clone())
    # same value either way; the chain adds gradient through the previous step's logits
    assert not torch.allclose(grads[0], grads[1])


def test_behaviour_logprobs_as_pi_old(tiny_dir):
    """old_logp='rollout' (off-policy 'behaviour'): pi_old is the rollout's recorded log-probs; on policy the
    ratio is 1 because the replay recomputes them."""
    policy = load_policy(tiny_dir)
    trajs = rollouts(policy, prompts=PROMPTS[:2])
    samples = [ScoredSample(t, advantage=(1.0 if i else -1.0), reward=float(i)) for i, t in enumerate(trajs)]
    learner = Learner(policy, LearnerConfig(algorithm="tracerl", estimator="canvas_trace", mu=1, micro_batch_size=2,
                                            old_logp="rollout", optim=OptimConfig(lr=1e-3)))
    m = learner.update(samples)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["clipfrac"] == 0.0
