"""d-TreeRPO's rollout tree: its shape, node values and local advantages, and the transitions it trains on.

d-TreeRPO (arXiv 2512.09675; THU-BPM/d-TreeRPO dtreerpo/dtreerpo_trainer.py) decodes each prompt as a tree. With T
denoising steps and contraction factor s, nodes sit at steps 0, T/s, 2T/s, ..., T (branch points); the root (all
masks) has `root_children` children and every inner node `branch_factor` children, each child continuing its
parent's state for T/s more steps. Leaves are finished responses, valued by the reward; an inner node's value is the
mean of its children's; a node's local advantage is its value minus the mean value of its siblings (0 without
siblings). Every edge parent -> child is one training transition: the tokens unmasked between the two states
(through the child's first EOS) are scored by ONE forward of the parent state, with the child's local advantage.

In diffrl the tree is decoded as its leaves: leaf (i_1, ..., i_d) is one request whose generator restarts from a
seed of (i_1..i_k) at the k-th branch step (GenerationRequest.branch_seeds), so all leaves under a node decode that
node's prefix bit for bit (batch-invariant decoding) and diverge after it. A node's state is any of its leaves'
state before the node's step (no remasking: the step map replays it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

Path = tuple[int, ...]


@dataclass(frozen=True)
class TreeShape:
    total_steps: int  # T: denoising steps of a full decode
    contraction: int  # s: number of levels (edges from root to leaf)
    root_children: int  # num_tree_samples
    branch_factor: int  # tree_branch_factor

    def __post_init__(self) -> None:
        if self.contraction < 1 or self.root_children < 1 or self.branch_factor < 1 or self.total_steps < 1:
            raise ValueError(f"tree: contraction, root_children, branch_factor and total_steps must be >= 1: {self}")

    def branch_steps(self) -> list[int]:
        """Global steps at which levels 1..s-1 branch (the reference's points T - k*T/s, counted from the start)."""
        return sorted({int(k * self.total_steps / self.contraction) for k in range(1, self.contraction)}
                      - {0, self.total_steps})

    @property
    def levels(self) -> int:
        return len(self.branch_steps()) + 1

    def leaves(self) -> list[Path]:
        """Every leaf's path (child index at each level), in request order."""
        widths = [self.root_children] + [self.branch_factor] * (self.levels - 1)
        return list(itertools.product(*(range(w) for w in widths)))

    @property
    def num_leaves(self) -> int:
        return self.root_children * self.branch_factor ** (self.levels - 1)


def node_values(leaf_rewards: dict[Path, float]) -> dict[Path, float]:
    """Every node's value: leaves their reward, inner nodes (prefixes of leaf paths, the root () included) the mean
    of their present children's values."""
    values: dict[Path, float] = dict(leaf_rewards)
    depth = max(len(p) for p in leaf_rewards)
    for level in range(depth - 1, -1, -1):
        children: dict[Path, list[float]] = {}
        for path, value in values.items():
            if len(path) == level + 1:
                children.setdefault(path[:level], []).append(value)
        for parent, vals in children.items():
            values[parent] = sum(vals) / len(vals)
    return values


def local_advantages(values: dict[Path, float]) -> dict[Path, float]:
    """Each non-root node's value minus the mean of its siblings' values (0 when it has none)."""
    out = {}
    for path, value in values.items():
        if not path:
            continue
        siblings = [v for p, v in values.items() if len(p) == len(path) and p[:-1] == path[:-1] and p != path]
        out[path] = value - sum(siblings) / len(siblings) if siblings else 0.0
    return out


def transition_codes(parent_state: torch.Tensor, child_state: torch.Tensor, mask_id: int, eos_id: int | None
                     ) -> torch.Tensor:
    """The state code (rl.step_samples) of one edge: 0 where the parent state shows the token, 1 where the parent
    is masked and the child decoded it at or before the child's first EOS (trained), 2 for other masked positions."""
    parent_masked = parent_state == mask_id
    changed = parent_masked & (child_state != mask_id)
    through_eos = torch.ones_like(changed)
    if eos_id is not None:
        eos = (child_state == eos_id).nonzero()
        if eos.numel():
            through_eos[int(eos[0]) + 1:] = False
    code = torch.zeros_like(parent_state)
    code[parent_masked] = 2
    code[changed & through_eos] = 1
    return code
