"""TrajectoryStore: scored trajectories by policy version, persisted append-only as Parquet, one file per add.

    store = TrajectoryStore("runs/NAME/store")
    store.add(step=3, samples)               # rl.sample.ScoredSample list -> store/step_000003.parquet
                                              # (temp file + rename: never half-written)
    store.state_dict() / store.load_state_dict(cursor)   # the cursor saved in checkpoints

Each row is one response: step, policy version, request id, prompt index, sample index, prompt ids, response ids,
step map, rollout log-probs, valid length, NFE, finish reason, response text, reward, reason, advantage, reward
metrics and sampling params (JSON). The files read back with `datasets.load_dataset("parquet", data_files=...)`
or pyarrow for auditing (`read_store`). A crash loses nothing already added: every add is on disk before it
returns. Nothing is kept in memory: the learner gets its batch from the driver, never from the store.

On resume the cursor names the files the checkpoint knew; files written after it (steps that will be replayed)
are moved to `superseded/`, not deleted, so the audit trail keeps both versions.

The plain class imports no Ray; `store_actor()` wraps it as a thin Ray actor for the driver.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rl.atomic_io import atomic_output, stale_temporaries
from rl.sample import ScoredSample
from rollout.errors import OneLineError

__all__ = ["TrajectoryStore", "StoreError", "SCHEMA", "trajectory_row", "store_actor", "read_store"]

_FILE = re.compile(r"^step_(\d{6,})(?:-(\d+))?\.parquet$")

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("version", pa.int64()),
    ("request_id", pa.string()),
    ("prompt_index", pa.int64()),
    ("sample_index", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("step_map", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("valid_length", pa.int32()),
    ("nfe", pa.int32()),
    ("finish_reason", pa.string()),
    ("response_text", pa.string()),
    ("reward", pa.float64()),
    ("reason", pa.string()),
    ("advantage", pa.float32()),
    ("reward_metrics", pa.string()),  # JSON object
    ("sampling", pa.string()),  # JSON object
    ("canvas_trace", pa.binary()),  # rollout.canvas_trace.CanvasTrace.to_bytes() (DiffusionGemma), else null
    ("prefilled", pa.list_(pa.int32())),  # response positions pre-filled by the driver (IGPO); null: none
    # Per denoising step, when the rollout recorded them (Trajectory.step_*; MDPO): (S, L) each, else null.
    ("step_states", pa.list_(pa.list_(pa.int32()))),
    ("step_predictions", pa.list_(pa.list_(pa.int32()))),
    ("step_confidence", pa.list_(pa.list_(pa.float32()))),
    ("step_rewards", pa.list_(pa.float64())),  # ScoredSample.step_rewards
    ("token_entropy", pa.list_(pa.float32())),  # Trajectory.token_entropy (AGRPO's entropy proposal), else null
])


class StoreError(OneLineError):
    """A store directory or cursor that does not match (one line naming the file)."""


def _ints(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.reshape(-1).tolist()]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def trajectory_row(step: int, sample: ScoredSample) -> dict[str, Any]:
    """One Parquet row: the trajectory's tensors and the driver's scored fields (unset ones are null)."""
    traj, advantage = sample.trajectory, sample.advantage
    if isinstance(advantage, torch.Tensor):  # token-level advantages: the store keeps their mean for auditing
        advantage = float(advantage.float().mean()) if advantage.numel() else None
    return {
        "step": int(step),
        "version": int(traj.policy_version),
        "request_id": traj.request_id,
        "prompt_index": sample.prompt_index,
        "sample_index": sample.sample_index,
        "prompt_ids": _ints(traj.prompt_ids),
        "response_ids": _ints(traj.response_ids),
        "step_map": _ints(traj.step_map),
        "logprobs": [float(x) for x in traj.logprobs.reshape(-1).float().tolist()],
        "valid_length": int(traj.valid_length),
        "nfe": int(traj.nfe),
        "finish_reason": traj.finish_reason,
        "response_text": sample.response_text,
        "reward": None if sample.reward is None else float(sample.reward),
        "reason": sample.reason,
        "advantage": None if advantage is None else float(advantage),
        "reward_metrics": _json(sample.reward_metrics),
        "sampling": _json(traj.sampling),
        "canvas_trace": None if traj.canvas_trace is None else traj.canvas_trace.to_bytes(),
        "prefilled": None if traj.prefilled is None else _ints(traj.prefilled.nonzero().reshape(-1)),
        "step_states": _rows(traj.step_states),
        "step_predictions": _rows(traj.step_predictions),
        "step_confidence": _rows(traj.step_confidence),
        "step_rewards": None if sample.step_rewards is None else [float(x) for x in sample.step_rewards.tolist()],
        "token_entropy": None if traj.token_entropy is None else [float(x) for x in traj.token_entropy.tolist()],
    }


def _rows(t: torch.Tensor | None) -> list[list] | None:
    """A 2-D tensor as nested lists (null when absent)."""
    return None if t is None else t.tolist()


class TrajectoryStore:
    """Append-only Parquet log of scored samples, one file per add, and the cursor checkpoints save."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._files: list[str] = sorted((p.name for p in self.root.iterdir() if _FILE.match(p.name)), key=_file_key)
        self._rows = sum(pq.read_metadata(self.root / name).num_rows for name in self._files)
        for stale in stale_temporaries(self.root, "*.parquet"):  # a crash between write and rename
            stale.unlink()

    # ---------------------------------------------------------------------------------------------- writing
    def add(self, step: int, samples: Iterable[ScoredSample]) -> str:
        """Persist one batch (fsynced, atomic); returns the file name."""
        rows = [trajectory_row(step, s) for s in samples]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        name = self._next_name(step)
        with atomic_output(self.root / name) as tmp:
            pq.write_table(table, tmp)
        self._files.append(name)
        self._rows += len(rows)
        return name

    def _next_name(self, step: int) -> str:
        base = f"step_{step:06d}"
        if not (self.root / f"{base}.parquet").exists():
            return f"{base}.parquet"
        part = 1
        while (self.root / f"{base}-{part}.parquet").exists():
            part += 1
        return f"{base}-{part}.parquet"

    # ---------------------------------------------------------------------------------------------- reading
    def files(self) -> list[Path]:
        return [self.root / name for name in self._files]

    def summary(self) -> dict[str, Any]:
        return {"files": len(self._files), "rows": self._rows}

    # ----------------------------------------------------------------------------------------------- cursor
    def state_dict(self) -> dict[str, Any]:
        return {"files": list(self._files), "rows": self._rows}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Rewind to a checkpoint's cursor: its files must all be here; later ones move to superseded/.
        Returns the names of the files moved aside."""
        wanted = list(state.get("files", []))
        missing = [name for name in wanted if not (self.root / name).is_file()]
        if missing:
            raise StoreError(f"store: {self.root / missing[0]}: listed in the checkpoint's store cursor but missing")
        moved = []
        for name in self._files:
            if name not in wanted:
                target = self.root / "superseded"
                target.mkdir(exist_ok=True)
                shutil.move(str(self.root / name), str(_free_name(target, name)))
                moved.append(name)
        self._files = wanted
        self._rows = sum(pq.read_metadata(self.root / name).num_rows for name in wanted)
        return moved


def _file_key(name: str) -> tuple[int, int]:
    match = _FILE.match(name)
    return int(match.group(1)), int(match.group(2) or 0)


def _free_name(folder: Path, name: str) -> Path:
    candidate, n = folder / name, 1
    while candidate.exists():
        candidate = folder / f"{name}.{n}"
        n += 1
    return candidate


def read_store(root: str | os.PathLike):
    """The whole store as a `datasets.Dataset` (every step's file, in order)."""
    import datasets

    files = [str(Path(root) / name) for name in sorted((p.name for p in Path(root).iterdir() if _FILE.match(p.name)),
                                                          key=_file_key)] if Path(root).is_dir() else []
    if not files:
        raise StoreError(f"store: {root}: no step_*.parquet files")
    datasets.disable_progress_bars()
    return datasets.load_dataset("parquet", data_files=files, split="train", keep_in_memory=True)


def store_actor(root: str | os.PathLike, **options):
    """The store as a Ray actor (thin: the same methods, called with `.remote`). Options go to `.options()`."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(TrajectoryStore)
    return actor_cls.options(**options).remote(str(root))
