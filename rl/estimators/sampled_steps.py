"""AGRPO's timestep estimator: the trajectory's per-step log-probs at a few sampled denoising steps.

AGRPO (Zhan, "Simple Policy Gradients for Reasoning with Diffusion Language Models", probablyabot/agrpo) trains the
policy of individual denoising steps. For a response decoded in steps 0..T, its objective per sample is the mean
over those steps of the step's summed token loss,
    J = 1/(T+1) * sum_{t=0}^{T} sum_{j unmasked at t} l_j,
and it estimates J from K steps t_k drawn from a proposal q over {0..T}:
    J_hat = 1/K * sum_k w(t_k) * sum_{j unmasked at t_k} l_j,    w(t) = (1/(T+1)) / q(t),
so E[J_hat] = J (unbiased; uniform q gives w = 1). Proposals: "uniform", or "entropy" (AGRPO's published
train.yaml): q(t) proportional to 1e-8 + the summed rollout sampling entropies of the tokens unmasked at t
(Trajectory.token_entropy, recorded with sampling.record_entropy), drawn by inverse CDF. T is the last step that
unmasked a non-EOS token (steps that only wrote EOS padding are never drawn); every token of a drawn step counts,
EOS included (agrpo_trainer.py).
`objective="sum"` targets sum_t instead of the mean (w = 1 / q(t)).

The estimate is returned as per-token log-probs at the drawn steps (0 elsewhere) and per-token weights
`extra["token_weight"]` = sum over the draws hitting the token's step of w(t_k) / K; a step drawn twice is scored
once (the same forward) and weighted twice. Draws come from the per-sample generator
(seed, sample key, inner iteration), so the old and current policies of one inner iteration see the same steps.
`low_discrepancy`: the K uniforms of a sample are stratified, u_k = (pi_k + U_k) / K for a random permutation pi
(AGRPO's sampler stratifies over the whole batch's B*K uniforms; per sample keeps a sample's draws independent of
the batch it sits in; each u_k is still uniform on [0, 1), so the estimate stays unbiased).
"""
from __future__ import annotations

import torch

from rl.estimators.base import ESTIMATORS, Estimate, EstimatorInput, padded, token_mask_of
from rl.masking import sample_generator
from rollout.models.layout import RowPacking, score_packing

OBJECTIVES = ("mean", "sum")
PROPOSALS = ("uniform", "entropy")


def last_content_step(step_map: torch.Tensor, response: torch.Tensor, eos_token_id: int | None) -> int:
    """T: the last step that unmasked a non-EOS token (all steps when every token is EOS or there is no EOS id)."""
    content = step_map if eos_token_id is None else step_map[response != eos_token_id]
    return int((content if content.numel() else step_map).max())


def draw_uniforms(generator: torch.Generator, k: int, low_discrepancy: bool) -> torch.Tensor:
    """(k,) float64 uniforms on [0, 1): independent, or one in each stratum [i/k, (i+1)/k) in random order."""
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    if low_discrepancy:
        u = (torch.randperm(k, generator=generator).double() + u) / k
    return u


def uniform_steps(u: torch.Tensor, last_step: int) -> torch.Tensor:
    """Steps floor(u (T+1)) in {0..T}, uniform when u is."""
    return torch.clamp((u * (last_step + 1)).floor().long(), max=last_step)


def step_importance_weight(steps: torch.Tensor, proposal: torch.Tensor, objective: str) -> torch.Tensor:
    """w(t) for drawn `steps` from `proposal` (T+1,) probabilities: (1/(T+1)) / q(t) ("mean") or 1 / q(t)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"estimator.objective: {objective!r} not in {OBJECTIVES}")
    q = proposal.double()[steps]
    scale = 1.0 / proposal.numel() if objective == "mean" else 1.0
    return scale / q


def token_weights(step_map: torch.Tensor, steps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(L,) per-token weight: sum over draws k with steps[k] == the token's step of weights[k] / K."""
    hit = step_map.long()[None, :] == steps.long()[:, None]  # (K, L)
    return (hit.double() * weights.double()[:, None]).sum(0) / steps.numel()


def entropy_proposal(step_map: torch.Tensor, token_entropy: torch.Tensor, last_step: int) -> torch.Tensor:
    """(T+1,) q(t) proportional to 1e-8 + the summed entropies of the tokens unmasked at step t (agrpo_trainer.py)."""
    mass = torch.full((last_step + 1,), 1e-8, dtype=torch.float64)
    keep = step_map <= last_step
    mass.index_add_(0, step_map[keep].long(), token_entropy[keep].double())
    return mass / mass.sum()


def inverse_cdf_steps(u: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
    """Steps t with cdf(t-1) < u <= cdf(t) (torch.searchsorted, left), never past the last step."""
    return torch.searchsorted(proposal.cumsum(0), u).clamp(max=proposal.numel() - 1)


def draw_steps(step_map: torch.Tensor, response: torch.Tensor, eos_token_id: int | None, generator: torch.Generator,
               num_samples: int, *, low_discrepancy: bool, objective: str, proposal: str = "uniform",
               token_entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps (K,), importance weights (K,)) for one sample."""
    if proposal not in PROPOSALS:
        raise ValueError(f"estimator.proposal: {proposal!r} not in {PROPOSALS}")
    last = last_content_step(step_map, response, eos_token_id)
    u = draw_uniforms(generator, num_samples, low_discrepancy)
    if proposal == "entropy":
        if token_entropy is None:
            raise ValueError("estimator.proposal: 'entropy' needs the rollout's token entropies "
                             "(sampling.record_entropy)")
        q = entropy_proposal(step_map, token_entropy, last)
        steps = inverse_cdf_steps(u, q)
    else:
        q = torch.full((last + 1,), 1.0 / (last + 1), dtype=torch.float64)
        steps = uniform_steps(u, last)
    return steps, step_importance_weight(steps, q, objective)


def score_at_steps(policy, inp: EstimatorInput, steps: list[torch.Tensor], *, temperature: float = 1.0,
                   return_entropy: bool = False, packing: RowPacking | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Per-token log-probs (B, Lmax) of the tokens unmasked at each sample's `steps` (each distinct step once),
    from the state just before that step; 0 elsewhere. Pass r scores every sample's r-th distinct step."""
    spec = policy.spec
    width = max(inp.length(b) for b in range(len(inp)))
    device = policy.device
    token_logp = torch.zeros((len(inp), width), device=device)
    entropy = torch.zeros_like(token_logp) if return_entropy else None
    distinct = [torch.unique(s.long()) for s in steps]
    forwards = 0
    for r in range(max(d.numel() for d in distinct)):
        members = [b for b in range(len(inp)) if distinct[b].numel() > r]
        noisy, score = [], []
        for b in members:
            step_map = inp.step_maps[b].long().cpu()
            t = int(distinct[b][r])
            state = inp.responses[b].clone()
            state[step_map >= t] = spec.mask_token_id
            noisy.append(state)
            score.append(step_map == t)
        out = policy.score_responses([inp.prompts[b] for b in members], [inp.responses[b] for b in members], noisy,
                                     score_mask=score, temperature=temperature, return_entropy=return_entropy,
                                     **score_packing(packing))
        forwards += 1
        rows = torch.tensor(members, device=device)
        n = out.logprobs.shape[1]
        token_logp[rows, :n] = token_logp[rows, :n] + out.logprobs  # each token is scored in one pass at most
        if return_entropy:
            entropy[rows, :n] = entropy[rows, :n] + out.entropy
    return token_logp, entropy, forwards


@ESTIMATORS.register("sampled_steps", num_samples=24, low_discrepancy=True, objective="mean", proposal="uniform")
def sampled_steps_estimator(policy, inp: EstimatorInput, *, seed: int = 0, inner_iter: int = 0,
                            num_samples: int = 24, low_discrepancy: bool = True, objective: str = "mean",
                            proposal: str = "uniform", temperature: float = 1.0, return_entropy: bool = False,
                            return_hidden: bool = False, packing: RowPacking | None = None) -> Estimate:
    if return_hidden:
        raise ValueError("estimator 'sampled_steps': no hidden states (a value model needs 'trajectory')")
    if num_samples < 1:
        raise ValueError(f"estimator.num_samples: must be >= 1, got {num_samples}")
    if inp.step_maps is None:
        raise ValueError("estimator 'sampled_steps' needs step maps (rollout trajectories), none were given")
    eos = policy.spec.eos_token_id
    steps, weights = [], []
    for b in range(len(inp)):
        step_map = inp.step_maps[b].long().cpu()
        if step_map.numel() != inp.length(b) or step_map.numel() == 0:
            raise ValueError(f"estimator 'sampled_steps': sample {b} step map length {step_map.numel()} "
                             f"!= response length {inp.length(b)} (or empty)")
        gen = sample_generator(seed, inp.sample_keys[b], inner_iter, stream="agrpo_steps")
        entropy_b = inp.token_entropies[b].cpu() if inp.token_entropies is not None else None
        s, iw = draw_steps(step_map, inp.responses[b].cpu(), eos, gen, num_samples, low_discrepancy=low_discrepancy,
                           objective=objective, proposal=proposal, token_entropy=entropy_b)
        steps.append(s)
        weights.append(token_weights(step_map, s, iw))
    token_logp, entropy, forwards = score_at_steps(policy, inp, steps, temperature=temperature,
                                                   return_entropy=return_entropy, packing=packing)
    width = token_logp.shape[1]
    weight = padded([w.float() for w in weights], width, fill=0.0).to(policy.device)
    mask = token_mask_of(inp, policy.device) & (weight > 0)
    return Estimate(
        token_logp=token_logp, seq_logp=(weight * token_logp * mask).sum(-1), token_mask=mask, forwards=forwards,
        step_ids=padded([m.long() for m in inp.step_maps], width, fill=-1).to(policy.device), entropy=entropy,
        extra={"token_weight": weight, "drawn_steps": steps},
    )
