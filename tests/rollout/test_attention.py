"""Attention kernels over mask descriptions (rollout/models/attention.py) against the dense reference.

The reference is the dense additive mask from masks.attention_bias passed to the model as a tensor (the path every
result of diffrl was computed with before), and, for packed rows, each sample scored alone. flex runs without
gradients only on CPU (torch 2.13 has no FlexAttention backward there); every flex case here has batch 2 and
fits one 128 x 128 shape bucket, so the suite compiles its kernel once.
"""
from __future__ import annotations

import logging

import pytest
import torch

from rollout.models import attention, attention_chunked
from rollout.models.attention import AttentionMask, resolve_kernel
from rollout.models.masks import attention_bias

KERNELS = ("chunked", "flex")
TOL = 1e-5


def _ids(policy, n, g):
    return torch.randint(10, len(policy.tokenizer), (n,), generator=g)


def _batch(policy, seed=0, prompt_lens=(7, 5), response_lens=(9, 14)):
    """A padded batch (different prompt and response lengths) with some response tokens masked."""
    g = torch.Generator().manual_seed(seed)
    prompts = [_ids(policy, n, g) for n in prompt_lens]
    responses = [_ids(policy, n, g) for n in response_lens]
    noisy = []
    for r in responses:
        x = r.clone()
        x[torch.rand(r.numel(), generator=g) < 0.5] = policy.spec.mask_token_id
        noisy.append(x)
    return prompts, responses, noisy


def _reference_bias(mask: AttentionMask) -> torch.Tensor:
    """masks.attention_bias on the description's per-position tensors: the dense rule as it always was."""
    return attention_bias(mask.q_block, mask.k_block, mask.k_valid, q_noisy=mask.q_noisy, k_noisy=mask.k_noisy,
                          full=mask.full)


class _Kernel:
    """Select a kernel on a shared policy for one block, restoring the previous one."""

    def __init__(self, policy, kernel):
        self.policy, self.kernel = policy, kernel

    def __enter__(self):
        self.before, self.policy.attention_kernel = self.policy.attention_kernel, self.kernel

    def __exit__(self, *exc):
        self.policy.attention_kernel = self.before


@pytest.fixture(params=["one_chunk", "small_chunks"])
def chunking(request, monkeypatch):
    """The chunked kernel as configured, and with 4-row chunks whose biases are never kept (key ranges trimmed,
    each chunk rebuilt per layer and, under autograd, recomputed in backward)."""
    if request.param == "small_chunks":
        monkeypatch.setattr(attention_chunked, "MIN_ROWS", 4)
        monkeypatch.setattr(attention_chunked, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(attention_chunked, "KEEP_ELEMENTS", 0)
    return request.param


# ------------------------------------------------------------------------------------------- the rule
def _naive_visible(b, n, v, d, full, q, k) -> bool:
    """The shared semantics (ISSUE 13), one pair at a time."""
    if not v[k] or d[q] != d[k]:
        return False
    if full:
        return True
    if not n[k]:
        return b[k] < b[q] or (b[k] == b[q] and not n[q])
    return bool(n[q]) and b[k] == b[q]


@pytest.mark.parametrize("full", [False, True])
def test_description_follows_the_rule_pair_by_pair(full):
    g = torch.Generator().manual_seed(3)
    t = 23
    b = torch.randint(-2, 4, (1, t), generator=g)
    n = torch.rand(1, t, generator=g) < 0.4
    v = torch.rand(1, t, generator=g) < 0.8
    d = torch.randint(0, 2, (1, t), generator=g)
    d[0, 5], v[0, 5] = 3, False  # a query with no visible key (a padding position of its own document)
    mask = AttentionMask.build(b, b, v, q_noisy=n, k_noisy=n, q_doc=d, k_doc=d, full=full)
    allowed = mask.visible()[0]
    for q in range(t):
        for k in range(t):
            assert bool(allowed[q, k]) == _naive_visible(b[0].tolist(), n[0].tolist(), v[0].tolist(),
                                                         d[0].tolist(), full, q, k), (q, k)
    dense = mask.dense_bias()[0, 0]
    empty = ~allowed.any(dim=1)
    assert empty[5]  # a row with no visible key attends everywhere (no NaN)
    assert (dense[empty] == 0).all() and torch.equal(dense[~empty] == 0, allowed[~empty])


def test_without_documents_the_dense_mask_is_masks_attention_bias():
    g = torch.Generator().manual_seed(4)
    b = torch.randint(-1, 5, (2, 31), generator=g)
    n = torch.rand(2, 31, generator=g) < 0.5
    v = torch.rand(2, 31, generator=g) < 0.9
    for kwargs in (dict(), dict(q_noisy=n, k_noisy=n), dict(full=True)):
        mask = AttentionMask.build(b, b, v, **kwargs)
        assert torch.equal(mask.dense_bias(), _reference_bias(mask))


# ---------------------------------------------------------------------------------- model equivalence
@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_equal_the_dense_mask_on_the_training_layout(tiny_policies, kind, kernel, chunking):
    """Padded batch of 2 through the training layout (block: both alignments via block/sdar; full attention:
    llada/dream): every position's logits and the scored log-probs equal the dense tensor path."""
    if kernel == "flex" and chunking == "small_chunks":
        pytest.skip("chunking is the chunked kernel's")
    policy = tiny_policies[kind]
    prompts, responses, noisy = _batch(policy)
    for alignment in (("absolute", "response") if policy.spec.is_block else (None,)):
        packed = policy.pack(prompts, responses, noisy, alignment=alignment)
        assert isinstance(packed.attn_bias, AttentionMask)
        valid = packed.attn_bias.k_valid
        with torch.no_grad():
            ref = policy.forward(packed.input_ids, packed.position_ids, _reference_bias(packed.attn_bias)).logits
            with _Kernel(policy, kernel):
                ours = policy.forward(packed.input_ids, packed.position_ids, packed.attn_bias).logits
                scores = policy.score_responses(prompts, responses, noisy, alignment=alignment)
            with _Kernel(policy, "dense"):
                dense = policy.score_responses(prompts, responses, noisy, alignment=alignment)
        assert (ours - ref)[valid].abs().max().item() <= TOL
        assert torch.equal(scores.valid, dense.valid) and scores.valid.sum() == sum(r.numel() for r in responses)
        assert (scores.logprobs - dense.logprobs).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["sdar", "llada"])
def test_chunked_gradients_equal_the_dense_mask(tiny_policies, kind, chunking):
    """Training: log-probs and their parameter gradients under the chunked kernel equal the dense path's."""
    policy = tiny_policies[kind]
    prompts, responses, noisy = _batch(policy, seed=1)
    params = [p for p in policy.model.parameters()]
    results = {}
    for kernel in ("dense", "chunked"):
        with _Kernel(policy, kernel):
            scores = policy.score_responses(prompts, responses, noisy)
        loss = (scores.logprobs * torch.linspace(0.5, 1.5, scores.logprobs.shape[1])).sum()
        results[kernel] = (scores.logprobs.detach(), torch.autograd.grad(loss, params))
    (lp_d, g_d), (lp_c, g_c) = results["dense"], results["chunked"]
    assert (lp_d - lp_c).abs().max().item() <= TOL
    for a, b in zip(g_d, g_c, strict=True):
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item())


def _packed_row(policy, samples):
    """Several samples laid out one after another in one row (document ids 0, 1, ...), positions restarting at 0
    per document, plus 3 padding positions; returns the row's tensors and each document's column range."""
    parts, spans, start = [], [], 0
    for doc, (prompt, response, noisy) in enumerate(samples):
        one = policy.pack([prompt], [response], [noisy])
        parts.append((one, doc))
        width = one.input_ids.shape[1]
        spans.append((start, start + width, one))
        start += width
    ids = torch.cat([one.input_ids[0] for one, _ in parts] + [torch.full((3,), policy.spec.pad_token_id)])
    pos = torch.cat([one.position_ids[0] for one, _ in parts] + [torch.zeros(3, dtype=torch.long)])
    block = torch.cat([one.attn_bias.q_block[0] for one, _ in parts] + [torch.zeros(3, dtype=torch.long)])
    noisy = torch.cat([one.attn_bias.q_noisy[0] for one, _ in parts] + [torch.zeros(3, dtype=torch.bool)])
    valid = torch.cat([one.attn_bias.k_valid[0] for one, _ in parts] + [torch.zeros(3, dtype=torch.bool)])
    doc = torch.cat([torch.full((one.input_ids.shape[1],), d) for one, d in parts] + [torch.full((3,), 7)])
    return ids, pos, block, noisy, valid, doc, spans


@pytest.mark.parametrize("kind", ["sdar", "block", "dream"])
@pytest.mark.parametrize("kernel", ("dense",) + KERNELS)
def test_packed_documents_score_as_if_alone(tiny_policies, kind, kernel, chunking):
    """Two rows, the first packing three samples, the second two: each document's logits equal the sample's own
    forward (dense reference, alone); without document ids they would not (the test can fail)."""
    if kernel != "chunked" and chunking == "small_chunks":
        pytest.skip("chunking is the chunked kernel's")
    policy = tiny_policies[kind]
    g = torch.Generator().manual_seed(5)
    lengths = [[(4, 6), (6, 9), (3, 5)], [(5, 11), (7, 4)]]
    rows = [[(_ids(policy, p, g), _ids(policy, r, g), _ids(policy, r, g)) for p, r in row] for row in lengths]
    built = [_packed_row(policy, samples) for samples in rows]
    width = max(b[0].numel() for b in built)

    def stack(i, fill):
        return torch.stack([torch.cat([b[i], torch.full((width - b[i].numel(),), fill, dtype=b[i].dtype)])
                            for b in built])

    ids, pos, block, noisy = stack(0, policy.spec.pad_token_id), stack(1, 0), stack(2, 0), stack(3, False)
    valid, doc = stack(4, False), stack(5, 9)
    full = not policy.spec.is_block
    with_docs = AttentionMask.build(block, block, valid, q_noisy=noisy, k_noisy=noisy, q_doc=doc, k_doc=doc, full=full)
    without = AttentionMask.build(block, block, valid, q_noisy=noisy, k_noisy=noisy, full=full)
    with torch.no_grad(), _Kernel(policy, kernel):
        packed = policy.forward(ids, pos, with_docs).logits
        unpacked = policy.forward(ids, pos, without).logits
    leaks = 0.0
    for r, (_, _, _, _, _, _, spans) in enumerate(built):
        for lo, hi, one in spans:
            with torch.no_grad():
                alone = policy.forward(one.input_ids, one.position_ids, _reference_bias(one.attn_bias)).logits[0]
            assert (packed[r, lo:hi] - alone).abs().max().item() <= TOL
            leaks = max(leaks, (unpacked[r, lo:hi] - alone).abs().max().item())
    assert leaks > 1e-3  # later documents would see earlier ones without their ids


# ------------------------------------------------------------------------------------------- memory
def test_chunked_kernel_never_builds_a_full_mask(tiny_policies, monkeypatch):
    """With 16-row chunks, no bias the chunked kernel builds has more than 16 query rows (nor the full key width
    for a trimmed chunk of the block layout), while the dense path would build (B, 1, T, T)."""
    monkeypatch.setattr(attention_chunked, "MIN_ROWS", 16)
    monkeypatch.setattr(attention_chunked, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(attention_chunked, "KEEP_ELEMENTS", 0)
    shapes = []
    real = attention_chunked.additive
    monkeypatch.setattr(attention_chunked, "additive", lambda allowed, dtype: shapes.append(allowed.shape) or
                        real(allowed, dtype))
    policy = tiny_policies["sdar"]
    prompts, responses, noisy = _batch(policy, response_lens=(40, 33))
    with _Kernel(policy, "chunked"), torch.no_grad():
        policy.score_responses(prompts, responses, noisy)
    t = policy.pack(prompts, responses, noisy).input_ids.shape[1]
    assert shapes and max(s[1] for s in shapes) <= 16
    assert min(s[2] for s in shapes) < t // 4  # early chunks see only the prompt and the first blocks


# -------------------------------------------------------------------------------------------- selection
def test_kernel_selection_is_explicit_and_logged(tiny_policies, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernel("auto", cpu, needs_grad=True) == "chunked"
    assert resolve_kernel("auto", cuda, needs_grad=True, q_len=4096) == "flex"
    assert resolve_kernel("auto", cuda, needs_grad=False, q_len=8) == "chunked"  # a cached decoding step
    assert resolve_kernel("flex", cpu, needs_grad=False) == "flex"
    with pytest.raises(RuntimeError, match="model.attention_kernel: flex has no backward on CPU"):
        resolve_kernel("flex", cpu, needs_grad=True)
    with pytest.raises(ValueError, match="model.attention_kernel: unknown kernel 'fast'"):
        resolve_kernel("fast", cpu, needs_grad=False)
    policy = tiny_policies["block"]
    assert policy.attn_implementation == "sdpa"
    monkey_logged = set()
    attention._LOGGED, saved = monkey_logged, attention._LOGGED
    try:
        prompts, responses, noisy = _batch(policy)
        with caplog.at_level(logging.INFO, logger="rollout.models.attention"), torch.no_grad():
            policy.score_responses(prompts, responses, noisy)
            policy.score_responses(prompts, responses, noisy)
    finally:
        attention._LOGGED = saved
    lines = [r.getMessage() for r in caplog.records if r.name == "rollout.models.attention"]
    assert lines == ["attention: chunked (exact, O(T) mask state)"]


@pytest.mark.slow  # one more FlexAttention compile (the 640 bucket): ~12 s of CPU
def test_flex_block_mask_over_several_tiles(tiny_policies):
    """A 5 x 5-tile BlockMask (T = 621, bucket 640): tiles skipped, tiles run whole (no mask_mod) and partial tiles
    all occur, and the logits still equal the dense path's (the single-tile cases above cannot tell them apart)."""
    from rollout.models.attention_flex import TILE, build_block_mask, bucket

    policy = tiny_policies["sdar"]
    prompts, responses, noisy = _batch(policy, seed=2, prompt_lens=(21, 30), response_lens=(300, 280))
    packed = policy.pack(prompts, responses, noisy)
    t = packed.input_ids.shape[1]
    pad = bucket(t)
    assert pad // TILE == 5
    blocks = build_block_mask(packed.attn_bias, pad, pad)
    partial, whole = blocks.kv_num_blocks.sum().item(), blocks.full_kv_num_blocks.sum().item()
    assert partial > 0 and whole > 0 and partial + whole < 2 * 5 * 5  # some tiles are skipped
    valid = packed.attn_bias.k_valid
    with torch.no_grad():
        ref = policy.forward(packed.input_ids, packed.position_ids, _reference_bias(packed.attn_bias)).logits
        with _Kernel(policy, "flex"):
            ours = policy.forward(packed.input_ids, packed.position_ids, packed.attn_bias).logits
    assert (ours - ref)[valid].abs().max().item() <= TOL
