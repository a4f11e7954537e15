"""TraceRL's diffusion value model: the head, GAE over decoding steps, token advantages and the value loss.

Notation (ALGORITHMS.md): token j of a response was decoded at step t(j); its value V_j is read at its noisy
position (the state where j is still masked). Steps of a sample are the distinct step ids of its counted tokens
(token_mask), ranked 0..S_b-1 in order (ids skipped by EOS truncation are simply absent). Per sample:
  step value   V*_t = mean_{j: t(j)=t} V_j              step reward r*_t = mean_{j: t(j)=t} r_j
  token reward r_j  = token_rewards_j (optional) + R_final on the tokens of the last step
  delta_t = r*_t - V*_t + gamma V*_{t+1},   A*_t = delta_t + gamma lam A*_{t+1},   R*_t = r*_t + gamma R*_{t+1}
  token:  A_j = r_j - V_j + gamma V*_{t+1} + gamma lam A*_{t+1},   R_j = r_j + gamma R*_{t+1}  (returns="mc")
  (terms past the last step are 0). With gamma = lam = 1 and only the outcome reward: A_j = R_final - V_j and
  R_j = R_final for every token.
Value loss: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, -clip, clip).
Vectorised over the batch with scatter; the only Python loop runs over decoding steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class ValueHead(nn.Module):
    """hidden states (B, T, H) -> values (B, T) in float32. The trunk (a HF model) is wired in elsewhere."""

    def __init__(self, hidden_size: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        if init_std > 0:
            nn.init.normal_(self.proj.weight, std=init_std)
        else:
            nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values (B, T) of the whole training input -> (B, L) at each token's noisy position `positions` (B, L)."""
    return torch.gather(values, 1, positions.long())


def compact_steps(step_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each counted token's step among its sample's distinct counted steps ((B, L) long, -1 where not
    counted) and the number of steps per sample ((B,) long)."""
    if step_ids.shape != token_mask.shape or step_ids.dim() != 2:
        raise ValueError(f"value: step_ids {tuple(step_ids.shape)} and token_mask {tuple(token_mask.shape)} "
                         "must be the same (B, L)")
    mask = token_mask.bool()
    if bool((step_ids[mask] < 0).any()):
        raise ValueError("value: a counted token has a negative step id (never decoded)")
    b = step_ids.shape[0]
    s_max = int(step_ids[mask].max()) + 1 if bool(mask.any()) else 0
    col = torch.where(mask, step_ids.long(), torch.full_like(step_ids, s_max, dtype=torch.long))
    present = torch.zeros(b, s_max + 1, dtype=torch.bool, device=step_ids.device)
    present.scatter_(1, col, True)
    present = present[:, :s_max]
    rank_of_step = present.long().cumsum(1) - 1
    rank = torch.gather(torch.cat([rank_of_step, rank_of_step.new_full((b, 1), -1)], 1), 1, col)
    return torch.where(mask, rank, torch.full_like(rank, -1)), present.sum(1)


def step_means(x: torch.Tensor, rank: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of x (B, L) over the tokens of each compact step -> ((B, S) means, (B, S) token counts)."""
    b = x.shape[0]
    col = torch.where(rank >= 0, rank, torch.full_like(rank, num_steps))
    sums = torch.zeros(b, num_steps + 1, dtype=x.dtype, device=x.device).scatter_add_(1, col, x)
    counts = torch.zeros(b, num_steps + 1, dtype=x.dtype, device=x.device).scatter_add_(1, col, torch.ones_like(x))
    sums, counts = sums[:, :num_steps], counts[:, :num_steps]
    return sums / counts.clamp(min=1), counts


@dataclass
class ValueTargets:
    advantages: torch.Tensor  # (B, L) token advantages A_j (0 where not counted)
    returns: torch.Tensor  # (B, L) token value targets R_j (0 where not counted)
    token_rewards: torch.Tensor  # (B, L) r_j
    step_values: torch.Tensor  # (B, S) V*_t (0 past a sample's last step)
    step_rewards: torch.Tensor  # (B, S) r*_t
    step_advantages: torch.Tensor  # (B, S) A*_t
    step_returns: torch.Tensor  # (B, S) R*_t
    step_mask: torch.Tensor  # (B, S) bool: t < num_steps
    step_rank: torch.Tensor  # (B, L) compact step of each token (-1 where not counted)
    num_steps: torch.Tensor  # (B,) long


def compute_value_targets(values: torch.Tensor, step_ids: torch.Tensor, token_mask: torch.Tensor,
                          rewards: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0,
                          token_rewards: torch.Tensor | None = None, returns: str = "mc") -> ValueTargets:
    """Token advantages and value targets from per-token old values (B, L) (detached here), step ids (B, L)
    (a trajectory's step_map), token_mask (B, L) and final rewards (B,). returns="mc": R_j = r_j + gamma R*_{t+1}
    (TraceRL); returns="gae": R_j = A_j + V_j (lambda-returns)."""
    if values.shape != step_ids.shape:
        raise ValueError(f"value: values {tuple(values.shape)} != step_ids {tuple(step_ids.shape)}")
    if rewards.shape != (values.shape[0],):
        raise ValueError(f"value: rewards shape {tuple(rewards.shape)} != ({values.shape[0]},)")
    mask = token_mask.bool()
    rank, num_steps = compact_steps(step_ids, mask)
    s = int(num_steps.max()) if num_steps.numel() else 0
    v = torch.where(mask, values.detach().to(torch.float64), torch.zeros((), dtype=torch.float64))
    last = mask & (rank == (num_steps - 1)[:, None])
    r_tok = torch.where(last, rewards.detach().to(torch.float64)[:, None], torch.zeros((), dtype=torch.float64))
    if token_rewards is not None:
        if token_rewards.shape != values.shape:
            raise ValueError(f"value: token_rewards {tuple(token_rewards.shape)} != values {tuple(values.shape)}")
        r_tok = r_tok + torch.where(mask, token_rewards.detach().to(torch.float64), torch.zeros((), dtype=torch.float64))

    v_star, _ = step_means(v, rank, s)
    r_star, _ = step_means(r_tok, rank, s)
    b = values.shape[0]
    a_star = torch.zeros(b, s + 1, dtype=torch.float64, device=values.device)
    ret_star = torch.zeros(b, s + 1, dtype=torch.float64, device=values.device)
    v_pad = torch.cat([v_star, v_star.new_zeros(b, 1)], 1)
    for t in range(s - 1, -1, -1):  # over decoding steps only; padded steps past a sample's end stay 0
        delta = r_star[:, t] - v_star[:, t] + gamma * v_pad[:, t + 1]
        a_star[:, t] = delta + gamma * lam * a_star[:, t + 1]
        ret_star[:, t] = r_star[:, t] + gamma * ret_star[:, t + 1]

    nxt = torch.where(mask, rank + 1, torch.full_like(rank, s))  # index of step t(j)+1 in the padded tables
    adv = r_tok - v + gamma * torch.gather(v_pad, 1, nxt) + gamma * lam * torch.gather(a_star, 1, nxt)
    if returns == "mc":
        ret = r_tok + gamma * torch.gather(ret_star, 1, nxt)
    elif returns == "gae":
        ret = adv + v
    else:
        raise ValueError(f"value: unknown returns '{returns}' (mc | gae)")
    zero = torch.zeros((), dtype=torch.float64)
    step_mask = torch.arange(s, device=values.device)[None, :] < num_steps[:, None]
    return ValueTargets(
        advantages=torch.where(mask, adv, zero).float(), returns=torch.where(mask, ret, zero).float(),
        token_rewards=r_tok.float(), step_values=v_star.float(), step_rewards=r_star.float(),
        step_advantages=a_star[:, :s].float(), step_returns=ret_star[:, :s].float(), step_mask=step_mask,
        step_rank=rank, num_steps=num_steps)


def clipped_value_loss_per_token(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                                 clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 max((V - R)^2, (V_clip - R)^2) per token, and where the clipped branch is the larger one."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, token_mask: torch.Tensor, *,
               clip: float | None = 0.2, normalizer: float | torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean clipped value loss. `normalizer`: the counted-token total of the whole (global) batch, so that
    the sum of micro-batch losses equals the whole-batch loss; defaults to this call's token count."""
    for name, x in (("old_values", old_values), ("returns", returns), ("token_mask", token_mask)):
        if x.shape != values.shape:
            raise ValueError(f"value_loss: {name} shape {tuple(x.shape)} != values {tuple(values.shape)}")
    mask = token_mask.bool()
    per_token, clipped = clipped_value_loss_per_token(values, old_values.detach(), returns.detach(), clip)
    per_token = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype))
    n_local = mask.sum()
    denom = torch.as_tensor(normalizer if normalizer is not None else n_local, dtype=per_token.dtype,
                            device=per_token.device).clamp(min=1)
    loss = per_token.sum() / denom
    m = mask.float()
    count = n_local.clamp(min=1)
    metrics = {
        "value_loss": loss.detach(),
        "value_clipfrac": (clipped.float() * m).sum() / count,
        "value_mean": (values.detach() * m).sum() / count,
        "return_mean": (returns.detach() * m).sum() / count,
        "value_error": ((values.detach() - returns.detach()).abs() * m).sum() / count,
    }
    return loss, metrics
