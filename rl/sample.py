"""ScoredSample: one response on its way from the driver through the store to the learner.

The rollout's `Trajectory` (token ids, step map, log-probs) plus what the driver derives from it: the decoded text,
the reward and its reason, the group-relative advantage and whether the sample is trained on. Typed fields, so
nothing between driver, store and learner is looked up by a string key. Filled in order by the driver (launch/
driver.py): prompt and sample index (`make_batch`), text and reward fields (`score`), advantage and keep
(`advantages`); then written whole to the store (rl.store, one Parquet column per field) and, when kept, trained on
by the learner (rl.learner_batch.rollout_batch reads the trajectory, the advantage and, for a value model, the
reward or advantage).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rollout.trajectory import Trajectory


@dataclass
class ScoredSample:
    trajectory: Trajectory
    prompt_index: int | None = None  # row of the prompt in the run's training set
    sample_index: int | None = None  # 0..n-1: which of the prompt's n samples (its place in the group)
    response_text: str | None = None  # the response through valid_length, decoded without special tokens
    reward: float | None = None  # the reward's scalar score; 0.0 for a failed generation (never scored)
    reason: str | None = None  # why: "correct", "wrong...", ...; a failed generation's finish_reason ("error: ...")
    reward_metrics: dict[str, float] = field(default_factory=dict)  # the reward's extra keys (step metrics)
    # () float: the sequence's advantage (wd1: its signed weight), or (L,) float per token; None: not computed.
    advantage: float | torch.Tensor | None = None
    keep: bool = False  # the sample's group passed the filters and the generation succeeded: trained on
    # Methods that train on intermediate states (MDPO, launch/driver_steps.py): (S,) the reward of each denoising
    # step's decoded prediction, and the per-step advantages derived from them; None otherwise.
    step_rewards: torch.Tensor | None = None
    step_advantages: torch.Tensor | None = None
    # d-TreeRPO's tree edges (launch/driver_tree.py): the parent node this edge leaves; edges sharing it are
    # siblings (the self-distillation groups). None otherwise; not stored (edges are built just before training).
    sibling_group: str | None = None

    @property
    def policy_version(self) -> int:
        return self.trajectory.policy_version

    @property
    def request_id(self) -> str:
        return self.trajectory.request_id
