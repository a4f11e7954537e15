"""Several noisy copies behind one clean part (`[prompt | clean | noisy 1 | ... | noisy G]`, layout.copies_layout):
the mask rule with copy indices, in every implementation (masks.attention_bias, AttentionMask, the chunked and flex
kernels), against a pair-by-pair reading of the rule in words; the layout against the single-copy layout; and the
policy's one-forward scoring of the copies against one single-copy forward per copy."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rollout.models.attention import AttentionMask, flex_available
from rollout.models.attention_chunked import chunked_attention
from rollout.models.layout import arrange_rows, copies_layout, layout_length, sample_layout
from rollout.models.masks import attention_bias
from rollout.models.spec import DiffusionSpec

TOL = 1e-5
MASK_ID, PAD_ID = 1, 0


def _spec(block_size=4, alignment="response", logits_shift=False) -> DiffusionSpec:
    return DiffusionSpec(kind="block", mask_token_id=MASK_ID, pad_token_id=PAD_ID, eos_token_id=2,
                         block_size=block_size, attention="block_causal", logits_shift=logits_shift,
                         block_alignment=alignment)


def _samples(seed, n, max_copies, block_size=4):
    """n samples (prompt, clean, [noisy canvases]) of random lengths, 1..max_copies canvases each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(1, 9, (1,), generator=g))
        length = int(torch.randint(1, 3 * block_size + 2, (1,), generator=g))
        prompt, clean = torch.randint(10, 50, (p,), generator=g), torch.randint(10, 50, (length,), generator=g)
        canvases = []
        for _ in range(int(torch.randint(1, max_copies + 1, (1,), generator=g))):
            x = clean.clone()
            x[torch.rand(length, generator=g) < 0.5] = MASK_ID
            canvases.append(x)
        out.append((prompt, clean, canvases))
    return out


def _rows(samples, spec, packed):
    layouts = [copies_layout(p, c, n, spec) for p, c, n in samples]
    return arrange_rows(layouts, pad_id=PAD_ID, full=False, packed=packed,
                        row_tokens=2 * max(len(lay) for lay in layouts) if packed else None)


def _rule_in_words(block, copy, valid, doc, q, k) -> bool:
    """masks.py in words: a key is seen only inside its document and when valid; a clean key (copy 0) by queries of
    later blocks, and by clean queries of its own block; a noisy key only by queries of its own block AND its own
    copy."""
    if not valid[k] or doc[q] != doc[k]:
        return False
    if copy[k] == 0:
        return block[k] < block[q] or (block[k] == block[q] and copy[q] == 0)
    return block[k] == block[q] and copy[q] == copy[k]


def _naive_allowed(mask: AttentionMask) -> torch.Tensor:
    bsz, _, q_len, k_len = mask.shape
    out = torch.zeros((bsz, q_len, k_len), dtype=torch.bool)
    for r in range(bsz):
        block, copy = mask.q_block[r].tolist(), mask.q_noisy[r].tolist()
        valid, doc = mask.k_valid[r].tolist(), mask.q_doc[r].tolist()
        for q in range(q_len):
            for k in range(k_len):
                out[r, q, k] = _rule_in_words(block, copy, valid, doc, q, k)
    return out


def _naive_attention(query, key, value, allowed, q_valid, scale):
    """Softmax attention over the allowed keys, each valid query separately (no kernel, no additive mask)."""
    out = torch.zeros_like(query)
    for r in range(query.shape[0]):
        for q in range(query.shape[2]):
            keys = allowed[r, q].nonzero().flatten()
            if not q_valid[r, q] or keys.numel() == 0:
                continue
            scores = torch.einsum("hd,hkd->hk", query[r, :, q], key[r, :, keys]) * scale
            out[r, :, q] = torch.einsum("hk,hkd->hd", scores.softmax(-1), value[r, :, keys])
    return out


CASES = [(alignment, packed, max_copies) for alignment in ("response", "absolute") for packed in (False, True)
         for max_copies in (1, 4)]


@pytest.mark.parametrize("alignment,packed,max_copies", CASES)
def test_every_mask_implementation_follows_the_rule_in_words(alignment, packed, max_copies):
    spec = _spec(alignment=alignment)
    rows = _rows(_samples(seed=max_copies + 10 * packed, n=3, max_copies=max_copies), spec, packed)
    mask = rows.mask
    assert int(mask.q_noisy.max()) >= 1 and mask.q_noisy.dtype == torch.long
    naive = _naive_allowed(mask)
    # Padding queries see no key by the rule; every implementation opens such rows (no NaN), so compare the rest.
    real = mask.q_valid
    assert torch.equal(mask.visible()[real], naive[real])
    docs = {"q_doc": mask.q_doc, "k_doc": mask.k_doc} if packed else {}
    dense = attention_bias(mask.q_block, mask.k_block, mask.k_valid, q_noisy=mask.q_noisy, k_noisy=mask.k_noisy,
                           **docs)[:, 0]
    assert torch.equal((dense == 0)[real], naive[real])
    assert torch.equal((mask.dense_bias()[:, 0] == 0)[real], naive[real])

    g = torch.Generator().manual_seed(7)
    bsz, _, t, _ = mask.shape
    query, key, value = (torch.randn(bsz, 2, t, 8, generator=g) for _ in range(3))
    ref = _naive_attention(query, key, value, naive, real, 8 ** -0.5)
    out = chunked_attention(query, key, value, mask, 8 ** -0.5)
    assert (out - ref)[real[:, None].expand(-1, 2, -1)].abs().max().item() <= TOL


def test_chunked_kernel_gradients_follow_the_rule_in_words():
    spec = _spec(alignment="absolute")
    mask = _rows(_samples(seed=5, n=3, max_copies=4), spec, packed=True).mask
    naive = _naive_allowed(mask)
    g = torch.Generator().manual_seed(8)
    bsz, _, t, _ = mask.shape
    inputs = [torch.randn(bsz, 2, t, 8, generator=g, requires_grad=True) for _ in range(3)]
    weight = torch.randn(bsz, 2, t, 8, generator=g) * mask.q_valid[:, None, :, None]
    ours = torch.autograd.grad((chunked_attention(*inputs, mask, 8 ** -0.5) * weight).sum(), inputs)
    ref = torch.autograd.grad((_naive_attention(*inputs, naive, mask.q_valid, 8 ** -0.5) * weight).sum(), inputs)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() <= TOL


@pytest.mark.skipif(not flex_available(), reason="no FlexAttention in this torch")
@pytest.mark.parametrize("alignment,packed", [("response", False), ("absolute", True)])
def test_flex_follows_the_rule_in_words(alignment, packed):
    from rollout.models.attention_flex import flex_attention_forward

    spec = _spec(alignment=alignment)
    # Two rows either way (one compiled batch bucket, as tests/rollout/test_attention.py keeps it).
    samples = _samples(seed=3, n=2 if not packed else 4, max_copies=4)
    rows = _rows(samples, spec, packed)
    if rows.num_rows != 2:
        pytest.skip(f"packing gave {rows.num_rows} rows")
    mask = rows.mask
    naive = _naive_allowed(mask)
    g = torch.Generator().manual_seed(9)
    bsz, _, t, _ = mask.shape
    query, key, value = (torch.randn(bsz, 2, t, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        out = flex_attention_forward(query, key, value, mask, 8 ** -0.5)
    ref = _naive_attention(query, key, value, naive, mask.q_valid, 8 ** -0.5)
    assert (out - ref)[mask.q_valid[:, None].expand(-1, 2, -1)].abs().max().item() <= TOL


def test_a_bool_noisy_flag_is_copy_one():
    block = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]])
    flags = torch.tensor([[False] * 4 + [True] * 4])
    valid = torch.ones_like(flags)
    as_bool = AttentionMask.build(block, block, valid, q_noisy=flags, k_noisy=flags)
    as_copy = AttentionMask.build(block, block, valid, q_noisy=flags.long(), k_noisy=flags.long())
    assert torch.equal(as_bool.visible(), as_copy.visible())
    assert torch.equal(attention_bias(block, block, valid, q_noisy=flags, k_noisy=flags),
                       attention_bias(block, block, valid, q_noisy=flags.long(), k_noisy=flags.long()))


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("logits_shift", [False, True])
@pytest.mark.parametrize("alignment", ["response", "absolute"])
def test_each_copy_is_the_single_copy_layouts_canvas(alignment, logits_shift):
    """Copy c holds exactly the single-copy layout's noisy canvas (tokens, positions, blocks), and its response and
    target positions point at the same (token, position, block, clean-or-noisy) as the single-copy layout's."""
    spec = _spec(alignment=alignment, logits_shift=logits_shift)
    for prompt, clean, canvases in _samples(seed=11, n=6, max_copies=4):
        many = copies_layout(prompt, clean, canvases, spec)
        assert len(many) == layout_length(spec, prompt.numel(), clean.numel(), copies=len(canvases))
        for c, canvas in enumerate(canvases):
            one = sample_layout(prompt, clean, canvas, spec)
            cut = len(one) - int(one.noisy.sum())  # the single layout's clean part
            assert torch.equal(many.ids[:cut], one.ids[:cut]) and torch.equal(many.pos[:cut], one.pos[:cut])
            mine = (many.noisy == c + 1).nonzero().flatten()
            assert torch.equal(many.ids[mine], one.ids[cut:]) and torch.equal(many.pos[mine], one.pos[cut:])
            assert torch.equal(many.block[mine], one.block[cut:])
            for name in ("response_pos", "target_pos"):
                at_many, at_one = getattr(many, name)[c], getattr(one, name)
                for field in ("ids", "pos", "block"):
                    assert torch.equal(getattr(many, field)[at_many], getattr(one, field)[at_one]), (name, field)
                # Clean in both or noisy in both (a noisy position: of this copy).
                assert torch.equal(many.noisy[at_many], one.noisy[at_one].long() * (c + 1)), name


def test_arrange_rows_carries_copy_indices():
    spec = _spec()
    samples = _samples(seed=2, n=4, max_copies=4)
    layouts = [copies_layout(p, c, n, spec) for p, c, n in samples]
    for packed in (False, True):
        rows = arrange_rows(layouts, pad_id=PAD_ID, full=False, packed=packed, row_tokens=10_000)
        for b, lay in enumerate(layouts):
            r, s = int(rows.row[b]), int(rows.start[b])
            assert torch.equal(rows.mask.q_noisy[r, s:s + len(lay)], lay.noisy)
            assert torch.equal(rows.mask.k_noisy[r, s:s + len(lay)], lay.noisy)


# ------------------------------------------------------------------------------------------------ policy
@pytest.mark.parametrize("kernel", ["chunked", "dense"])
@pytest.mark.parametrize("kind,alignment,logits_shift", [("block", None, False), ("sdar", None, False),
                                                         ("sdar", "response", False), ("block", None, True)])
def test_one_forward_over_copies_equals_one_forward_per_copy(tiny_policies, kind, alignment, logits_shift, kernel):
    from rollout.models.policy import DiffusionPolicy

    base = tiny_policies[kind]
    policy = DiffusionPolicy(base.model, base.tokenizer, dataclasses.replace(base.spec, logits_shift=logits_shift),
                             attention_kernel=kernel)
    g = torch.Generator().manual_seed(4)
    vocab = len(policy.tokenizer)
    prompts, responses, noisy, masks = [], [], [], []
    for copies, (p, length) in zip((3, 1, 4), ((5, 9), (7, 4), (3, 12))):
        prompts.append(torch.randint(10, vocab, (p,), generator=g))
        responses.append(torch.randint(10, vocab, (length,), generator=g))
        owner = torch.randint(0, copies, (length,), generator=g)  # each token scored by one copy
        canvases = []
        for _ in range(copies):
            x = responses[-1].clone()
            x[torch.rand(length, generator=g) < 0.5] = policy.spec.mask_token_id
            canvases.append(x)
        noisy.append(canvases)
        masks.append([owner == c for c in range(copies)])
    for packed in (False, True):
        kw = {"alignment": alignment, "packed": packed, "return_entropy": True, "return_hidden": True}
        with torch.no_grad():
            one = policy.score_trajectory_copies(prompts, responses, noisy, masks, **kw)
            ref_logp = torch.zeros_like(one.logprobs)
            ref_ent, ref_hidden = torch.zeros_like(one.logprobs), torch.zeros_like(one.hidden)
            for b in range(len(prompts)):
                for c, canvas in enumerate(noisy[b]):
                    alone = policy.score_responses([prompts[b]], [responses[b]], [canvas], score_mask=[masks[b][c]],
                                                   **kw)
                    n = responses[b].numel()
                    ref_logp[b, :n] += alone.logprobs[0]
                    ref_ent[b, :n] += alone.entropy[0]
                    sel = masks[b][c]
                    ref_hidden[b, :n][sel] = alone.hidden[0][sel]
        assert (one.logprobs - ref_logp).abs().max().item() <= TOL
        assert (one.entropy - ref_ent).abs().max().item() <= TOL
        assert (one.hidden - ref_hidden).abs().max().item() <= TOL
        lengths = torch.tensor([r.numel() for r in responses])
        assert torch.equal(one.valid.cpu(), torch.arange(one.valid.shape[1])[None] < lengths[:, None])
    assert math.isfinite(float(one.logprobs.sum()))


def test_a_token_scored_by_two_copies_is_refused(tiny_policies):
    policy = tiny_policies["block"]
    prompt, response = torch.tensor([11, 12, 13]), torch.tensor([14, 15, 16, 17])
    both = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="more than one copy"):
        policy.score_trajectory_copies([prompt], [response], [[response, response]], [[both, both]])
