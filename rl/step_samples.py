"""MDPO's per-step advantages and the intermediate-state samples it trains on (pure functions of tensors).

MDPO (He et al., arXiv 2508.13148; autonomousvision/mdpo src/open_r1/mdpo/mdpo_trainer.py) treats denoising as a
sequential decision problem. Each step t of a rollout has a reward r_t: the verifier's score of the answer decoded
from that step's prediction (the canvas with every masked position of the block filled by the step's samples).
Per sample, over its T steps ("adv-v4" in the reference: the reward difference plus the mean reward after t):
    a_t = (r_t - r_{t-1}) + 1 + mean(r_{t+1}, ..., r_{T-1})     (r_{-1} = 0; for t = T-1 the last term is r_{T-1})
then normalised per step across the group: A_t = (a_t - mean_g a_t) / (std_g a_t + 1e-4), std with Bessel's
correction as torch.std (0 in a group of one). Each sample trains on its k steps of largest |A_t| (the reference
ranks the device batch's summed |A_t|; its published setting holds one sample per device).

A trained step becomes one learner sample: the state before the step is the input, the prediction the target, and
every masked position of the state that the step predicted is scored with per-token advantage A_t * c_j * lambda_t,
c_j the probability the rollout sampled the token with and lambda_t = L / (masked positions) (the reference's
confidence weight and lambda_t; both positive, so they factor out of the clipped term). Its step map encodes the
state for estimator `intermediate_state`: 0 = visible, 1 = masked and scored, 2 = masked and not predicted.
"""
from __future__ import annotations

import torch

from rl.sample import ScoredSample
from rollout.trajectory import Trajectory

VISIBLE, SCORED, UNPREDICTED = 0, 1, 2


def mdpo_step_values(step_rewards: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards of each step's prediction -> (B, T) un-normalised step values a_t (module doc)."""
    r = step_rewards.double()
    if r.dim() != 2 or r.shape[1] < 1:
        raise ValueError(f"mdpo: step rewards must be (B, T) with T >= 1, got {tuple(r.shape)}")
    t = r.shape[1]
    diff = torch.cat([r[:, :1], r[:, 1:] - r[:, :-1]], dim=1) + 1
    later = r[:, 1:].flip(-1).cumsum(-1) / torch.arange(1, t, dtype=r.dtype)
    return diff + torch.cat([later.flip(-1), r[:, -1:]], dim=1)


def mdpo_step_advantages(step_rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, T) per-step advantages, each step normalised across its group (module doc)."""
    values = mdpo_step_values(step_rewards)
    out = torch.zeros_like(values)
    for g in torch.unique(group_ids):
        rows = group_ids == g
        v = values[rows]
        std = v.std(dim=0) if v.shape[0] > 1 else torch.zeros_like(v[0])
        out[rows] = (v - v.mean(dim=0)) / (std + eps)
    return out.float()


def padded_step_rewards(rewards: list[torch.Tensor]) -> torch.Tensor:
    """(B, T) from per-sample step rewards of different lengths: a sample that stopped early (EOS) keeps its final
    answer, so its last reward repeats."""
    t = max(r.numel() for r in rewards)
    return torch.stack([torch.cat([r.double(), r.double()[-1:].expand(t - r.numel())]) for r in rewards])


def select_steps(advantages: torch.Tensor, k: int, num_steps: int) -> list[int]:
    """The k steps (of the sample's own num_steps) with the largest |A_t|, in that order."""
    a = advantages[:num_steps].abs()
    return torch.topk(a, min(k, num_steps)).indices.tolist()


def intermediate_sample(sample: ScoredSample, step: int, advantage: float, mask_token_id: int) -> ScoredSample:
    """The learner sample of `sample`'s step `step` (module doc)."""
    traj = sample.trajectory
    if traj.step_states is None:
        raise ValueError(f"trajectory {traj.request_id}: no step records (decode with sampling.record_steps)")
    state, prediction = traj.step_states[step], traj.step_predictions[step]
    probability = traj.step_confidence[step].float()
    masked = state == mask_token_id
    scored = masked & (probability > 0)
    code = torch.full_like(state, VISIBLE)
    code[masked] = UNPREDICTED
    code[scored] = SCORED
    lam = state.numel() / (int(masked.sum()) + 1e-4)
    token_adv = torch.where(scored, advantage * probability * lam, torch.zeros_like(probability))
    logprobs = torch.where(scored, probability.clamp(min=1e-30).log(), torch.zeros_like(probability))
    pseudo = Trajectory(
        prompt_ids=traj.prompt_ids, response_ids=prediction.clone(), step_map=code, logprobs=logprobs,
        confidence=probability, valid_length=state.numel(), nfe=traj.nfe, finish_reason=traj.finish_reason,
        block_size=traj.block_size, sampling=traj.sampling, policy_version=traj.policy_version,
        request_id=f"{traj.request_id}@step{step}",
    )
    return ScoredSample(pseudo, prompt_index=sample.prompt_index, sample_index=sample.sample_index,
                        reward=sample.reward, reason=sample.reason, advantage=token_adv.float(), keep=True)
