"""The chunked kernel's document-aware plan (rollout/models/attention_chunked.py): chunks see only the key segments
of their own document (the training layout's clean prefix and own noisy blocks), and the kernel, forward and
backward, still equals dense attention under masks.attention_bias (the rule as it always was), on raw tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollout.models import attention_chunked
from rollout.models.attention_chunked import chunk_plan, chunked_attention
from rollout.models.masks import attention_bias

TOL = 1e-5


def _reference_bias(mask):
    return attention_bias(mask.q_block, mask.k_block, mask.k_valid, q_noisy=mask.q_noisy, k_noisy=mask.k_noisy,
                          full=mask.full, q_doc=mask.q_doc if mask.documents else None,
                          k_doc=mask.k_doc if mask.documents else None)


def _samples(policy, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(policy.tokenizer)
    out = []
    for p, r in lengths:
        prompt, clean = torch.randint(10, vocab, (p,), generator=g), torch.randint(10, vocab, (r,), generator=g)
        noisy = clean.clone()
        noisy[torch.rand(r, generator=g) < 0.5] = policy.spec.mask_token_id
        out.append((prompt, clean, noisy))
    return out


LENGTHS = [(5, 13), (9, 4), (3, 22), (7, 8)]  # documents of different widths: different visible sets


def _mask(policy, samples, packed, alignment=None):
    prompts, responses, noisy = (list(x) for x in zip(*samples))
    return policy.pack(prompts, responses, noisy, packed=packed, row_tokens=10_000 if packed else None,
                       alignment=alignment).attn_bias


@pytest.fixture
def small_chunks(monkeypatch):
    """4-row chunks, no bias kept across layers, no gap joined: many chunks per document, each rebuilt in backward,
    every invisible run of keys cut out."""
    monkeypatch.setattr(attention_chunked, "MIN_GAP", 1)
    monkeypatch.setattr(attention_chunked, "MIN_ROWS", 4)
    monkeypatch.setattr(attention_chunked, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(attention_chunked, "KEEP_ELEMENTS", 0)


def _area(mask):
    plan = chunk_plan(mask)
    return sum((mask.shape[0] if c.row is None else 1) * (c.q_hi - c.q_lo) * c.width for c in plan)


@pytest.mark.parametrize("kind,alignment", [("sdar", None), ("block", None), ("block", "response"), ("llada", None)])
def test_a_packed_row_costs_the_sum_of_its_documents(tiny_policies, small_chunks, kind, alignment):
    """Chunks never cross a document, never see another document's columns, and the attention area of one packed
    row (sum over chunks of queries x key columns) is exactly the sum of each document's area alone; a padded batch
    costs the same (padding queries skipped, padding keys cut off). A contiguous key range per chunk (the kernel
    before: first to last visible column) would cost far more: the test can fail."""
    policy = tiny_policies[kind]
    samples = _samples(policy, LENGTHS)
    row = _mask(policy, samples, packed=True, alignment=alignment)
    assert row.shape[0] == 1 and row.documents
    doc = row.q_doc[0]
    for chunk in chunk_plan(row):
        docs = doc[chunk.q_lo:chunk.q_hi].unique()
        assert docs.numel() == 1  # one document per chunk
        for lo, hi in chunk.segments:
            assert bool((doc[lo:hi] == docs[0]).all())  # key segments inside it
    alone = sum(_area(_mask(policy, [s], packed=False, alignment=alignment)) for s in samples)
    assert _area(row) == alone
    assert _area(_mask(policy, samples, packed=False, alignment=alignment)) == alone
    if policy.spec.is_block:
        # each noisy chunk sees two segments: the clean prefix up to its block, and its own noisy block(s)
        assert any(len(c.segments) == 2 for c in chunk_plan(row))
        contiguous = 0
        for c in chunk_plan(row):
            seen = row.visible(c.q_lo, c.q_hi)[0].any(dim=0).nonzero().flatten()
            contiguous += (c.q_hi - c.q_lo) * int(seen[-1] - seen[0] + 1)
        assert contiguous > 1.3 * alone


def _random_qkv(mask, seed, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    b, _, q_len, k_len = mask.shape
    q = torch.randn(b, heads, q_len, dim, generator=g)
    k = torch.randn(b, kv_heads, k_len, dim, generator=g)
    v = torch.randn(b, kv_heads, k_len, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("flash", [True, False], ids=["flash_backward", "recomputed_backward"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("kind", ["sdar", "block", "llada"])
def test_chunked_equals_dense_forward_and_gradients(tiny_policies, small_chunks, monkeypatch, kind, packed, flash):
    """Raw (B, H, Q, D) tensors with GQA through the chunked kernel vs SDPA under the dense reference bias: outputs
    at valid queries and the gradients of query, key and value (of a loss weighting valid queries only) agree."""
    if not flash:
        monkeypatch.setattr(attention_chunked, "FLASH_CPU", None)
    policy = tiny_policies[kind]
    mask = _mask(policy, _samples(policy, LENGTHS, seed=3), packed=packed)
    valid = mask.q_valid
    q, k, v = _random_qkv(mask, seed=4)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)) * valid[:, None, :, None]
    results = []
    for run in ("dense", "chunked"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if run == "dense":
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=_reference_bias(mask), scale=0.3,
                                                 enable_gqa=True)
        else:
            out = chunked_attention(qq, kk, vv, mask, 0.3)
        (out * weight).sum().backward()
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    (o_d, *g_d), (o_c, *g_c) = results
    assert (o_d - o_c).transpose(1, 2)[valid].abs().max().item() <= TOL
    assert (o_c.transpose(1, 2)[~valid] == 0).all()  # padding queries are not computed
    for a, b in zip(g_d, g_c, strict=True):
        assert a.abs().max().item() > 0.1
        assert (a - b).abs().max().item() <= TOL
    assert len(chunk_plan(mask)) > 4  # several chunks: the Function path ran


def test_decoding_masks_keep_the_contiguous_plan(tiny_policies):
    """A mask with neither documents nor query validity (decoding) keeps one chunk over every key when it fits."""
    policy = tiny_policies["sdar"]
    mask = _mask(policy, _samples(policy, LENGTHS[:2]), packed=False)
    from rollout.models.attention import AttentionMask

    bare = AttentionMask.build(mask.q_block, mask.k_block, mask.k_valid, q_noisy=mask.q_noisy, k_noisy=mask.k_noisy)
    plan = chunk_plan(bare)
    assert len(plan) == 1 and plan[0].row is None and plan[0].segments == ((0, mask.shape[3]),)
