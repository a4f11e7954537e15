"""Token log-probs from hidden states (rollout.models.policy.token_logprobs): values and gradients equal the plain
full-vocabulary computation, and what backward keeps does not grow with rows x vocab (chunks are recomputed).

Measured (saved-tensor bytes while gradients are on, unique storages; 600 rows, hidden 16, chunks of 128 rows):
vocab 512 and 4096 both keep 43,200 B (the hidden rows and targets); the former chunked computation kept 1,304,768 B
and 10,135,744 B."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rollout.models.policy as policy_module
from rollout.models.policy import token_logprobs


class _Projection:
    """Stands in for a DiffusionPolicy: only logits_from_hidden is used (a linear vocabulary head)."""

    def __init__(self, hidden: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.head = torch.nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=g))
            self.head.bias.copy_(torch.randn(vocab, generator=g))

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _plain(policy, hidden, targets, temperature):
    """Straight from the definition in fp32: log softmax(W h / T)[target], entropy = -sum p log p, no chunks."""
    logits = policy.logits_from_hidden(hidden).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _old_chunked(policy, hidden, targets):
    """What token_logprobs did before: chunks, every chunk's logits and log-softmax kept for backward."""
    out = []
    for s in range(0, hidden.shape[0], policy_module.LOGIT_CHUNK_ROWS):
        logp_all = F.log_softmax(policy.logits_from_hidden(hidden[s:s + policy_module.LOGIT_CHUNK_ROWS]).float(), -1)
        out.append(logp_all.gather(-1, targets[s:s + policy_module.LOGIT_CHUNK_ROWS, None]).squeeze(-1))
    return torch.cat(out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_gradients_equal_the_plain_computation(monkeypatch, temperature):
    monkeypatch.setattr(policy_module, "LOGIT_CHUNK_ROWS", 64)  # 300 rows: 5 chunks, the last partial
    g = torch.Generator().manual_seed(0)
    pol = _Projection(16, 97, seed=1)
    hidden = torch.randn(300, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 97, (300,), generator=g)
    w_logp = torch.randn(300, generator=g)
    results = []
    for fn in (lambda: token_logprobs(pol, hidden, targets, temperature=temperature, with_entropy=True),
               lambda: _plain(pol, hidden, targets, temperature)):
        logp, ent = fn()
        params = [hidden, pol.head.weight, pol.head.bias]
        # the entropy is a metric without a graph (launch/diagnostics): gradients of the log-probs, entropy values
        grads = torch.autograd.grad((logp * w_logp).sum(), params)
        results.append((logp, ent, grads))
    (logp, ent, grads), (want_logp, want_ent, want_grads) = results
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_logprobs_of_a_policy_equal_under_no_grad_and_grad(tiny_policies):
    """The tiny model's own head (tied/untied as built): the recomputing path gives the no-grad path's values."""
    pol = tiny_policies["block"]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, pol.hidden_size, generator=g)
    targets = torch.randint(0, 90, (40,), generator=g)
    with torch.no_grad():
        plain, _ = token_logprobs(pol, hidden, targets)
    recomputed, _ = token_logprobs(pol, hidden.requires_grad_(), targets)
    assert recomputed.requires_grad
    assert torch.equal(recomputed.detach(), plain)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    assert out.requires_grad
    return sum(seen.values())


def test_saved_state_does_not_scale_with_rows_times_vocab(monkeypatch):
    monkeypatch.setattr(policy_module, "LOGIT_CHUNK_ROWS", 128)
    rows, width = 600, 16
    measured = {}
    for vocab in (512, 4096):
        pol = _Projection(width, vocab, seed=3)
        hidden = torch.randn(rows, width, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,))
        new = _saved_bytes(lambda: token_logprobs(pol, hidden, targets)[0])
        old = _saved_bytes(lambda: _old_chunked(pol, hidden, targets))
        measured[vocab] = (new, old)
        assert old >= rows * vocab * 4  # the old way: at least one fp32 (rows x vocab) buffer kept
        assert new <= 2 * rows * width * 4  # now: the hidden rows (and targets), whatever the vocabulary
    assert measured[512][0] == measured[4096][0], measured
