"""Packed rows: the document mask rule (against a naive per-pair rule), the layout builder (documents, restarted
positions, first-fit-decreasing), and packed scoring equal to unpacked scoring per sample for every model kind."""
from __future__ import annotations

import pytest
import torch

from rollout.models.attention import AttentionMask
from rollout.models.layout import first_fit_decreasing
from rollout.models.masks import PAD_BLOCK, attention_bias
from rollout.models.policy import DiffusionPolicy


def naive_visible(b, n, v, d, q: int, k: int, full: bool) -> bool:
    """ISSUE 13's rule, written out: q sees k iff v[k] and d[q] == d[k] and rule(b, n)."""
    if not (v[k] and d[q] == d[k]):
        return False
    if full:
        return True
    if n is None:
        return b[k] <= b[q]
    clean_key = (not n[k]) and (b[k] < b[q] or (b[k] == b[q] and not n[q]))
    noisy_key = n[k] and n[q] and b[k] == b[q]
    return clean_key or noisy_key


@pytest.mark.parametrize("builder", ["reference", "description"])
@pytest.mark.parametrize("full,with_noisy", [(False, True), (False, False), (True, False)])
def test_dense_bias_follows_the_document_rule(full, with_noisy, builder):
    """masks.attention_bias (the reference) and the AttentionMask the layout builder makes, against the naive rule."""
    g = torch.Generator().manual_seed(0)
    t = 23
    block = torch.randint(-2, 3, (2, t), generator=g)
    noisy = torch.rand((2, t), generator=g) < 0.4 if with_noisy else None
    valid = torch.rand((2, t), generator=g) < 0.85
    doc = torch.randint(0, 3, (2, t), generator=g)
    block[~valid] = PAD_BLOCK
    if builder == "reference":
        bias = attention_bias(block, block, valid, q_noisy=noisy, k_noisy=noisy, full=full, q_doc=doc, k_doc=doc)
    else:  # no noisy flags: all clean, the rule b[k] <= b[q]
        bias = AttentionMask.build(block, block, valid, q_noisy=noisy, k_noisy=noisy, full=full, q_doc=doc,
                                   k_doc=doc).dense_bias()
    assert bias.shape == (2, 1, t, t)
    kept_apart = 0  # pairs the block rule alone allows but the documents separate
    for r in range(2):
        n = None if noisy is None else noisy[r].tolist()
        b, v, d = block[r].tolist(), valid[r].tolist(), doc[r].tolist()
        for q in range(t):
            want = [naive_visible(b, n, v, d, q, k, full) for k in range(t)]
            got = (bias[r, 0, q] == 0).tolist()
            if any(want):
                assert got == want, (r, q)
                kept_apart += sum(naive_visible(b, n, v, [0] * t, q, k, full) and not want[k] for k in range(t))
            else:  # no visible key: the row attends everywhere (no NaN); its output is ignored
                assert all(got)
    assert kept_apart > 10


def _batch(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 90, (n,), generator=g) for n in (3, 7, 5, 9, 2, 6)]
    responses = [torch.randint(10, 90, (n,), generator=g) for n in (8, 3, 12, 5, 16, 4)]
    noisy = [torch.where(torch.rand(r.shape, generator=g) < 0.5, policy.spec.mask_token_id, r) for r in responses]
    return prompts, responses, noisy


def test_first_fit_decreasing_known_answer():
    assert first_fit_decreasing([5, 7, 3, 2, 4, 6], 10) == [[1, 2], [5, 4], [0, 3]]
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # an item over the capacity goes alone
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([1], 0)


@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
def test_packed_layout_documents_and_positions(tiny_policies, kind):
    policy = tiny_policies[kind]
    prompts, responses, noisy = _batch(policy)
    padded = policy.pack(prompts, responses, noisy)
    packed = policy.pack(prompts, responses, noisy, packed=True, row_tokens=48)
    assert packed.input_ids.shape[0] < len(prompts) == padded.input_ids.shape[0]
    assert packed.input_ids.shape[1] <= 48
    # document ids only where rows are shared (a remote-code model takes the padded batch, refusing documents)
    assert packed.attn_bias.documents and not padded.attn_bias.documents
    for b in range(len(prompts)):
        pr, r = int(packed.row[b]), int(padded.rows_of()[b])
        mine = (packed.attn_bias.q_doc[pr] == b) & packed.attn_bias.k_valid[pr]
        n = int(padded.attn_bias.k_valid[r].sum())
        assert int(mine.sum()) == n  # the whole layout, in one contiguous document
        idx = mine.nonzero().squeeze(-1)
        assert int(idx[-1] - idx[0]) + 1 == n
        # the same tokens and positions as alone: position ids restart at 0 at the document's start
        assert torch.equal(packed.input_ids[pr, idx], padded.input_ids[r, :n])
        assert torch.equal(packed.position_ids[pr, idx], padded.position_ids[r, :n])
        assert int(packed.position_ids[pr, idx[0]]) == 0
        assert torch.equal(packed.attn_bias.q_block[pr, idx], padded.attn_bias.q_block[r, :n])
        # response token i's input and logit positions point at the same tokens
        length = responses[b].numel()
        assert torch.equal(packed.input_ids[pr, packed.response_pos[b, :length]],
                           padded.input_ids[r, padded.response_pos[b, :length]])
    assert int(packed.attn_bias.k_valid.sum()) == int(padded.attn_bias.k_valid.sum())  # padding is never a valid key


@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
def test_packed_scoring_equals_unpacked_per_sample(tiny_policies, kind):
    """Log-probs, entropy and hidden states of every sample within 1e-5 (fp32), packed vs padded vs alone."""
    policy = tiny_policies[kind]
    prompts, responses, noisy = _batch(policy, seed=1)
    with torch.no_grad():
        padded = policy.score_responses(prompts, responses, noisy, return_entropy=True, return_hidden=True)
        packed = policy.score_responses(prompts, responses, noisy, return_entropy=True, return_hidden=True,
                                        packed=True, row_tokens=48)
        alone = [policy.score_responses([p], [r], [n]) for p, r, n in zip(prompts, responses, noisy)]
        # the document mask is what keeps samples apart: without it, packed scores change
        laid = policy.pack(prompts, responses, noisy, packed=True, row_tokens=48)
        m = laid.attn_bias
        leaky = attention_bias(m.q_block, m.k_block, m.k_valid, q_noisy=m.q_noisy, k_noisy=m.k_noisy, full=m.full)
        leaked = policy.forward(laid.input_ids, laid.position_ids, leaky, return_hidden=True, compute_logits=False)
        clean = policy.forward(laid.input_ids, laid.position_ids, laid.attn_bias, return_hidden=True,
                               compute_logits=False)
    assert torch.equal(packed.valid, padded.valid)
    ok = padded.valid
    torch.testing.assert_close(packed.logprobs, padded.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.entropy, padded.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.hidden[ok], padded.hidden[ok], rtol=0, atol=1e-5)
    for b, single in enumerate(alone):
        n = responses[b].numel()
        torch.testing.assert_close(packed.logprobs[b, :n], single.logprobs[0, :n], rtol=0, atol=1e-5)
    assert float((leaked.hidden - clean.hidden).abs().max()) > 1e-3


def test_packed_scoring_refuses_remote_code(tiny_policies):
    policy = tiny_policies["llada"]
    remote = DiffusionPolicy(policy.model, policy.tokenizer, policy.spec, {"remote_code": True})
    prompts, responses, noisy = _batch(policy)
    with pytest.raises(ValueError, match="packed rows need transformers' own model classes"):
        remote.score_responses(prompts, responses, noisy, packed=True)
