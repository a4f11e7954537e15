"""What the weight-sync tests share (test_weight_sync.py, test_collective_sync.py; not a test module itself)."""
from __future__ import annotations

import torch

from rollout.models.loading import load_policy


def perturbed_policy(path, seed: int = 0):
    """The checkpoint at `path` with every weight moved by N(0, 0.01^2) noise: weights no fresh load holds."""
    policy = load_policy(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return policy


def parameters_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}
