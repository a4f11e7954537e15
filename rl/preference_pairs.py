"""Preference pairs for the DPO trainer path (VRPO, dTRPO): records, the pair layout the losses read, and pairs
built offline from an existing run's trajectory store.

    pairs = pairs_from_store("runs/NAME/store", block_size=4)          # dTRPO: offline, no rollout workers
    samples = pair_samples(pairs)   # row 2i chosen (advantage +1), 2i+1 rejected (-1): rl.algorithms.preference

A pair from the store: the responses of one prompt in one step's group with the highest and the lowest reward
(strictly different: a group whose responses all scored the same carries no preference), failed generations and
empty responses left out. Each keeps its trajectory as the rollout recorded it (step map, behaviour log-probs,
policy version), so the `remasked_step` estimator re-masks the real decoding order; `version` says how many
updates old the data are against the policy being trained (logged as staleness).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.sample import ScoredSample
from rl.store import StoreError, read_store
from rollout.trajectory import Trajectory

__all__ = ["PreferencePair", "pair_samples", "pairs_from_store", "trajectory_of_row"]


@dataclass
class PreferencePair:
    chosen: Trajectory
    rejected: Trajectory
    key: str  # stable identity of the pair (seeds nothing itself; the trajectories' request ids seed their masks)
    margin: float | None = None  # reward(chosen) - reward(rejected) when known

    def __post_init__(self) -> None:
        if not torch.equal(self.chosen.prompt_ids, self.rejected.prompt_ids):
            raise ValueError(f"preference pair {self.key}: chosen and rejected answer different prompts")


def pair_samples(pairs: list[PreferencePair]) -> list[ScoredSample]:
    """The learner's rows: chosen then rejected of each pair, advantages +1 / -1 (the loss checks the layout)."""
    if not pairs:
        raise ValueError("preference update: no pairs")
    out = []
    for pair in pairs:
        out.append(ScoredSample(pair.chosen, advantage=1.0, keep=True))
        out.append(ScoredSample(pair.rejected, advantage=-1.0, keep=True))
    return out


def trajectory_of_row(row: dict, *, block_size: int, where: str) -> Trajectory:
    """A stored row back as the Trajectory the rollout produced (confidence is not stored: zeros)."""
    if row.get("prefilled"):
        raise StoreError(f"{where}: stored trajectory {row.get('request_id')} has pre-filled (IGPO hint) tokens: "
                         "not the policy's own trajectory, so not preference data")
    try:
        response = torch.tensor(row["response_ids"], dtype=torch.long)
        traj = Trajectory(
            prompt_ids=torch.tensor(row["prompt_ids"], dtype=torch.long), response_ids=response,
            step_map=torch.tensor(row["step_map"], dtype=torch.long),
            logprobs=torch.tensor(row["logprobs"], dtype=torch.float32), confidence=torch.zeros(response.numel()),
            valid_length=int(row["valid_length"]), nfe=int(row["nfe"]), finish_reason=str(row["finish_reason"]),
            block_size=int(block_size), sampling=json.loads(row["sampling"] or "{}"),
            policy_version=int(row["version"]), request_id=str(row["request_id"]))
        traj.validate()
    except (KeyError, TypeError, ValueError) as err:
        raise StoreError(f"{where}: unusable stored trajectory ({err})") from err
    return traj


def _usable(row: dict) -> bool:
    reason = row.get("reason") or ""
    return row.get("reward") is not None and not reason.startswith("error") and len(row["response_ids"]) > 0 \
        and not str(row.get("finish_reason") or "").startswith("error")


def pairs_from_store(root: str | os.PathLike, *, block_size: int, min_margin: float = 0.0) -> list[PreferencePair]:
    """Best-vs-worst pairs of every (step, prompt) group of the store at `root` (module doc). `min_margin`: keep a
    pair only when the reward gap exceeds it. One-line error when the store holds no usable pair."""
    table = read_store(root)
    groups: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for i, row in enumerate(table):
        if row.get("prompt_index") is None or row.get("step") is None:
            raise StoreError(f"store {root}: row {i} ({row.get('request_id')}): no step / prompt_index, so its group "
                             "is unknown (not a store the driver wrote)")
        if row.get("reward") is not None and not math.isfinite(float(row["reward"])):
            raise StoreError(f"store {root}: row {i} ({row.get('request_id')}): reward {row['reward']} is not finite "
                             "(a NaN would pair a response with itself)")
        if _usable(row):
            groups.setdefault((int(row["step"]), int(row["prompt_index"])), []).append((i, row))
    pairs = []
    for (step, prompt), rows in sorted(groups.items()):
        best = max(rows, key=lambda r: (r[1]["reward"], -r[0]))
        worst = min(rows, key=lambda r: (r[1]["reward"], r[0]))
        gap = float(best[1]["reward"]) - float(worst[1]["reward"])
        if gap <= min_margin:
            continue
        where = f"{Path(root)}: step {step}, prompt {prompt}"
        pairs.append(PreferencePair(trajectory_of_row(best[1], block_size=block_size, where=where),
                                    trajectory_of_row(worst[1], block_size=block_size, where=where),
                                    key=f"st{step}-p{prompt}", margin=gap))
    if not pairs:
        raise StoreError(f"store {root}: no (step, prompt) group with two usable responses whose rewards differ by "
                         f"more than {min_margin}: nothing to prefer")
    return pairs
