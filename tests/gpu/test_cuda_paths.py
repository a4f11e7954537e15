"""The CUDA paths, on a CUDA device (skipped without one; CI has none, the lead runs them on a lent GPU).

What only a GPU exercises: FlexAttention with gradients (the `auto` kernel for training forwards on CUDA), the
chunked kernel on CUDA tensors, packed rows through both, the rollout engine decoding on the device with per-row
CUDA generators, the learner's update on the device (fp32 against the same update on CPU) and its bf16 autocast.
References are the dense additive mask (the path every CPU result was computed with) and the CPU run of the same
code, fp32 throughout unless a test says otherwise; TF32 is switched off so fp32 means fp32.
"""
from __future__ import annotations

import os

import pytest
import torch

# DIFFRL_GPU_TESTS_ON=cpu runs the file on CPU (a dry run of the test code itself; flex gradients fail there)
CUDA = torch.device(os.environ.get("DIFFRL_GPU_TESTS_ON", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

from rl.learner import Learner, LearnerConfig
from rl.optim import OptimConfig
from rollout.engine import TorchEngine
from rollout.models.loading import load_policy
from rollout.sampling import GenerationRequest, SamplingParams
from tests.rl.test_learner_packing import mixed_trajectories
from tests.rollout.test_attention import _batch, _Kernel, _reference_bias

TOL = 1e-5


@pytest.fixture(autouse=True)
def _strict_fp32():
    if CUDA.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def cuda_policies(tiny_model_dirs):
    return {kind: load_policy(path, device=CUDA) for kind, path in tiny_model_dirs.items()}


@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
@pytest.mark.parametrize("kernel", ["flex", "chunked"])
def test_kernels_equal_dense_on_cuda(cuda_policies, kind, kernel):
    """Training layout, padded batch of 2, both block alignments: logits and scored log-probs equal the dense mask."""
    policy = cuda_policies[kind]
    prompts, responses, noisy = _batch(policy, 0)
    for alignment in (("absolute", "response") if policy.spec.is_block else (None,)):
        packed = policy.pack(prompts, responses, noisy, alignment=alignment)
        valid = packed.attn_bias.k_valid
        with torch.no_grad():
            ref = policy.forward(packed.input_ids, packed.position_ids, _reference_bias(packed.attn_bias)).logits
            with _Kernel(policy, kernel):
                ours = policy.forward(packed.input_ids, packed.position_ids, packed.attn_bias).logits
                scores = policy.score_responses(prompts, responses, noisy, alignment=alignment)
            with _Kernel(policy, "dense"):
                dense = policy.score_responses(prompts, responses, noisy, alignment=alignment)
        assert ours.device.type == CUDA.type
        assert (ours - ref)[valid].abs().max().item() <= TOL
        assert (scores.logprobs - dense.logprobs).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["sdar", "block", "llada"])
@pytest.mark.parametrize("kernel", ["flex", "chunked"])
def test_kernel_gradients_equal_dense_on_cuda(cuda_policies, kind, kernel):
    """FlexAttention's (and the chunked kernel's) backward on CUDA: parameter gradients equal the dense path's."""
    policy = cuda_policies[kind]
    prompts, responses, noisy = _batch(policy, 1)
    params = list(policy.model.parameters())
    results = {}
    for name in ("dense", kernel):
        with _Kernel(policy, name):
            scores = policy.score_responses(prompts, responses, noisy)
        weights = torch.linspace(0.5, 1.5, scores.logprobs.shape[1], device=CUDA)
        loss = (scores.logprobs * weights).sum()
        results[name] = (scores.logprobs.detach(), torch.autograd.grad(loss, params))
    (lp_d, g_d), (lp_k, g_k) = results["dense"], results[kernel]
    assert (lp_d - lp_k).abs().max().item() <= TOL
    for a, b in zip(g_d, g_k, strict=True):
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item())


def test_auto_kernel_is_flex_for_long_training_forwards_on_cuda(cuda_policies):
    from rollout.models.attention import resolve_kernel

    assert resolve_kernel("auto", CUDA, needs_grad=True, q_len=4096) == "flex"


def _update(path, device, kernel, **cfg):
    """One learner update (linear-in-gradient AdamW: weight deltas ~ the gradient); returns CPU weight deltas."""
    policy = load_policy(path, device=device, attention_kernel=kernel)
    w0 = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    config = LearnerConfig(mu=1, shuffle=False, optim=OptimConfig(lr=1e4, eps=1e4, betas=(0.9, 0.999)), **cfg)
    metrics = Learner(policy, config).update(mixed_trajectories(policy))
    return {k: (v.detach() - w0[k]).float().cpu() for k, v in policy.model.state_dict().items()}, metrics


@pytest.mark.parametrize("algorithm,estimator,kind,kernel", [
    ("tracerl", "trajectory", "sdar", "flex"), ("tracerl", "trajectory", "block", "chunked"),
    ("tracerl", "trajectory", "sdar", "chunked"),
    ("diffu_grpo", "one_step", "llada", "flex"), ("gdpo", "block_elbo", "sdar", "flex")])
def test_learner_update_on_cuda_equals_cpu(tiny_model_dirs, algorithm, estimator, kind, kernel):
    """The same update (packed and padded) on CUDA and on CPU: equal weight deltas (fp32)."""
    cfg = {"algorithm": algorithm, "estimator": estimator, "micro_batch_size": 2, "seed": 0}
    cpu, cpu_m = _update(tiny_model_dirs[kind], "cpu", "chunked", **cfg)
    for pack in (None, 96):
        gpu, gpu_m = _update(tiny_model_dirs[kind], CUDA, kernel, pack_tokens=pack, **cfg)
        worst = max((cpu[k] - gpu[k]).abs().max().item() / max(1e-3, cpu[k].abs().max().item()) for k in cpu)
        assert worst <= 1e-3, (pack, worst)
        if pack is None:  # the loss metric averages micro-batches, which packing regroups
            assert abs(cpu_m["loss"] - gpu_m["loss"]) <= 1e-4 * max(1.0, abs(cpu_m["loss"]))


@pytest.mark.parametrize("kernel", ["flex", "chunked"])
def test_bf16_autocast_learner_on_cuda_is_close_to_fp32(tiny_model_dirs, kernel):
    fp32, m32 = _update(tiny_model_dirs["sdar"], CUDA, kernel, algorithm="tracerl", estimator="trajectory",
                        micro_batch_size=2, seed=0)
    bf16, m16 = _update(tiny_model_dirs["sdar"], CUDA, kernel, algorithm="tracerl", estimator="trajectory",
                        micro_batch_size=2, seed=0, bf16=True)
    assert abs(m32["loss"] - m16["loss"]) <= 0.05 * max(1.0, abs(m32["loss"]))
    cos = torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in fp32.values()]),
                                                torch.cat([v.flatten() for v in bf16.values()]), dim=0)
    assert cos.item() >= 0.95


SAMPLING = {
    "sdar": SamplingParams(temperature=1.3, max_tokens=16, remasking="low_confidence_dynamic", threshold=0.05,
                           stop_at_eos=False),
    "llada": SamplingParams(temperature=1.3, max_tokens=32, remasking="low_confidence_static", steps_per_block=8,
                            stop_at_eos=False),
}


@pytest.mark.parametrize("kind", ["sdar", "llada"])
def test_rollout_decodes_on_cuda_and_the_learner_reproduces_it(cuda_policies, kind):
    """The engine decodes on the device (cached for block models), each row from its own CUDA generator; the
    trajectory estimator on CUDA reproduces every recorded log-prob."""
    from rl.estimators import get_estimator
    from rl.estimators.base import EstimatorInput

    policy, sampling = cuda_policies[kind], SAMPLING[kind]
    g = torch.Generator().manual_seed(0)
    requests = [GenerationRequest(torch.randint(10, 90, (n,), generator=g), sampling, seed=i, request_id=f"q{i}")
                for i, n in enumerate((3, 7, 5))]
    engine = TorchEngine(policy)
    trajectories = engine.generate(requests)
    again = TorchEngine(policy).generate(requests)
    for a, b in zip(trajectories, again, strict=True):  # per-row generators: reproducible on the device
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.step_map, b.step_map)
    inp = EstimatorInput([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
                         [t.request_id for t in trajectories], [t.response_length for t in trajectories],
                         [t.step_map for t in trajectories], trajectories[0].block_size)
    with torch.no_grad():
        est = get_estimator("trajectory")(policy, inp, temperature=sampling.temperature)
    assert est.token_logp.device.type == CUDA.type
    for b, t in enumerate(trajectories):
        n = t.response_length
        assert n > 0
        assert torch.allclose(est.token_logp[b, :n].cpu(), t.logprobs.float().cpu(), atol=1e-4)


@pytest.mark.parametrize("kind", ["sdar", "llada"])
def test_greedy_rollout_on_cuda_equals_cpu(tiny_model_dirs, cuda_policies, kind):
    """Greedy decoding (no random numbers) gives the same tokens and steps on CUDA as on CPU."""
    params = SamplingParams(temperature=0.0, max_tokens=16, remasking="low_confidence_static", steps_per_block=2,
                            stop_at_eos=False)
    g = torch.Generator().manual_seed(3)
    requests = [GenerationRequest(torch.randint(10, 90, (n,), generator=g), params, seed=i, request_id=f"g{i}")
                for i, n in enumerate((4, 9))]
    on_gpu = TorchEngine(cuda_policies[kind]).generate(requests)
    on_cpu = TorchEngine(load_policy(tiny_model_dirs[kind])).generate(requests)
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(a.response_ids.cpu(), b.response_ids) and torch.equal(a.step_map.cpu(), b.step_map)
