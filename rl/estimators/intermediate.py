"""Intermediate-state estimator (MDPO's trained steps, d-TreeRPO's tree edges): log p(target token | recorded
intermediate state) at the state's masked positions, one forward per batch. The state comes encoded in the step
map (rl/step_samples.py): 0 = visible (the response token is in the input), 1 = masked and scored (the response
holds the target), 2 = masked, not scored. Deterministic: nothing is drawn.
"""
from __future__ import annotations

import torch

from rl.estimators.base import ESTIMATORS, Estimate, EstimatorInput, token_mask_of
from rl.step_samples import SCORED, VISIBLE
from rollout.models.layout import RowPacking, score_packing


@ESTIMATORS.register("intermediate_state")
def intermediate_state_estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0,
                                 temperature: float = 1.0, return_entropy: bool = False,
                                 return_hidden: bool = False, packing: RowPacking | None = None) -> Estimate:
    del seed, inner_iter
    if return_hidden:
        raise ValueError("estimator 'intermediate_state': no hidden states (a value model needs 'trajectory')")
    if inp.step_maps is None:
        raise ValueError("estimator 'intermediate_state' needs the states' step-map codes (rl.step_samples)")
    noisy, score = [], []
    for b in range(len(inp)):
        code = inp.step_maps[b].long().cpu()
        if code.numel() != inp.length(b) or bool((code < VISIBLE).any()) or bool((code > 2).any()):
            raise ValueError(f"estimator 'intermediate_state': sample {b} step map is not a state code (0/1/2 per "
                             f"response token)")
        state = inp.responses[b].clone()
        state[code != VISIBLE] = policy.spec.mask_token_id
        noisy.append(state)
        score.append(code == SCORED)
    out = policy.score_responses(inp.prompts, inp.responses, noisy, score_mask=score, temperature=temperature,
                                 return_entropy=return_entropy, **score_packing(packing))
    width = max(inp.length(b) for b in range(len(inp)))
    device = policy.device
    token_logp = torch.zeros((len(inp), width), device=device)
    n = out.logprobs.shape[1]
    token_logp[:, :n] = out.logprobs
    entropy = None
    if return_entropy:
        entropy = torch.zeros_like(token_logp)
        entropy[:, :n] = out.entropy
    scored = torch.zeros((len(inp), width), dtype=torch.bool, device=device)
    for b, s in enumerate(score):
        scored[b, :s.numel()] = s.to(device)
    mask = token_mask_of(inp, device) & scored
    return Estimate(token_logp=token_logp, seq_logp=(token_logp * mask).sum(-1), token_mask=mask, forwards=1,
                    entropy=entropy)
