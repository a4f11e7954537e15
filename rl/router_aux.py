"""Router load-balancing auxiliary loss for mixture-of-experts policies (learner.router_aux_loss_coef).

The Switch Transformer / Qwen-MoE load-balancing loss over the router decisions of one training forward:

    L_aux = E * sum_e f_e * P_e
    f_e = fraction of routed (layer, token) pairs whose top-k experts include e   (sum_e f_e = k; no gradient)
    P_e = mean router probability softmax(router_logits)_e over the same pairs      (carries the gradient)

pooled over every MoE layer and every real token (layout padding excluded): transformers' Qwen-MoE
`load_balancing_loss_func` concatenates the layers the same way. Uniform routing gives L_aux = k; it grows as
routing concentrates on few experts. The learner adds coef * L_aux to the policy loss and logs L_aux.

The router outputs are taken with forward hooks on the routers (transformers' `Qwen3MoeTopKRouter` and any class
registered in ROUTER_CLASSES), and which tokens are real from the same forward's attention description (the
AttentionMask's key validity: in a training forward every query is also a key) or, for a dense additive mask, from
its diagonal (a real token always sees itself, padding sees nothing).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from rollout.models.attention import MASK_KWARG


def router_classes() -> tuple[type, ...]:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return (Qwen3MoeTopKRouter,)


def load_balancing_loss(router_logits: list[torch.Tensor], valid: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """E * sum_e f_e P_e over the real rows of every (N_i, E) logits tensor (valid: (N_i,) bool)."""
    if not router_logits:
        raise ValueError("router aux loss: no router logits were recorded (is the model a mixture of experts?)")
    logits = torch.cat([lg[v] for lg, v in zip(router_logits, valid, strict=True)]).float()
    if logits.shape[0] == 0:
        return router_logits[0].sum() * 0.0  # no real token: nothing to balance, still part of the graph
    experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    routed = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    return experts * (routed.mean(0) * probs.mean(0)).sum()


def _real_tokens(args, kwargs) -> torch.Tensor | None:
    """(B, T) bool of the forward's real tokens, or None when the mask says nothing (no padding)."""
    call = kwargs.get(MASK_KWARG)
    if call is not None:
        mask = call.description
        if mask.shape[2] != mask.shape[3]:
            raise ValueError("router aux loss: a cached forward (queries != keys) has no per-token validity here")
        return mask.k_valid
    dense = kwargs.get("attention_mask")
    if dense is None:
        return None
    if dense.dim() != 4 or dense.shape[-1] != dense.shape[-2]:
        raise ValueError(f"router aux loss: attention mask of shape {tuple(dense.shape)} is not a (B, 1, T, T) "
                         "training mask")
    return torch.diagonal(dense[:, 0], dim1=-2, dim2=-1) == 0


def router_aux_for(policy, coef: float) -> "RouterAux | None":
    """The recorder the learner uses when learner.router_aux_loss_coef > 0 (None when 0: off)."""
    if coef < 0 or coef != coef:
        raise ValueError(f"learner.router_aux_loss_coef: must be >= 0, got {coef}")
    return RouterAux(policy) if coef > 0 else None


class RouterAux:
    """Records the router logits of the forwards run inside `recording()`; `take()` returns the loss and clears."""

    def __init__(self, policy):
        classes = router_classes()
        self.routers = [m for m in policy.model.modules() if isinstance(m, classes)]
        if not self.routers:
            raise ValueError("learner.router_aux_loss_coef: the policy has no mixture-of-experts router "
                             f"({type(policy.causal_lm).__name__}); set it to 0")
        top = {int(r.top_k) for r in self.routers}
        if len(top) != 1:
            raise ValueError(f"learner.router_aux_loss_coef: routers disagree on top_k ({sorted(top)})")
        self.top_k = top.pop()
        self.trunk = policy.causal_lm.model
        self._logits: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []
        self._current: torch.Tensor | None = None

    @contextmanager
    def recording(self):
        def before_trunk(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            real = _real_tokens(args, kwargs)
            self._current = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if real is None else real

        def after_router(module, args, output):
            logits = output[0]
            if self._current is None or self._current.numel() != logits.shape[0]:
                raise ValueError("router aux loss: router input does not match the forward's tokens")
            self._logits.append(logits)
            self._valid.append(self._current.reshape(-1).to(logits.device))

        handles = [self.trunk.register_forward_pre_hook(before_trunk, with_kwargs=True)]
        handles += [r.register_forward_hook(after_router) for r in self.routers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._current = None

    def take(self) -> torch.Tensor:
        try:
            return load_balancing_loss(self._logits, self._valid, self.top_k)
        finally:
            self._logits, self._valid = [], []
