"""TrajectoryStore: scored trajectories by policy version, persisted append-only as Parquet, one file per add.

    store = TrajectoryStore("runs/NAME/store", max_items=4096)
    store.add(step=3, trajectories)          # -> store/step_000003.parquet (temp file + rename: never half-written)
    store.get(version=2)                      # in-memory window, newest versions kept (bounded)
    store.state_dict() / store.load_state_dict(cursor)   # the cursor saved in checkpoints

Each row is one response: step, policy version, request id, prompt index, sample index, prompt ids, response ids,
step map, rollout log-probs, valid length, NFE, finish reason, response text, reward, reason, advantage, reward
metrics and sampling params (JSON). The files read back with `datasets.load_dataset("parquet", data_files=...)`
or pyarrow for auditing. A crash loses nothing already added: every add is on disk before it returns.

On resume the cursor names the files the checkpoint knew; files written after it (steps that will be replayed)
are moved to `superseded/`, not deleted, so the audit trail keeps both versions.

The plain class imports no Ray; `store_actor()` wraps it as a thin Ray actor for the driver.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rl.atomic_io import atomic_output, stale_temporaries
from rollout.errors import OneLineError
from rollout.trajectory import Trajectory

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
])


class StoreError(OneLineError):
    """A store directory or cursor that does not match (one line naming the file)."""


def _ints(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.reshape(-1).tolist()]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def trajectory_row(step: int, traj: Trajectory) -> dict[str, Any]:
    """One Parquet row. Reward fields come from `traj.extra`: reward, reason, advantage, reward_metrics,
    response_text, prompt_index, sample_index (missing ones are null)."""
    extra = traj.extra
    advantage = extra.get("advantage")
    if isinstance(advantage, torch.Tensor):  # token-level advantages: the store keeps their mean for auditing
        advantage = float(advantage.float().mean()) if advantage.numel() else None
    reward = extra.get("reward")
    return {
        "step": int(step),
        "version": int(traj.policy_version),
        "request_id": traj.request_id,
        "prompt_index": extra.get("prompt_index"),
        "sample_index": extra.get("sample_index"),
        "prompt_ids": _ints(traj.prompt_ids),
        "response_ids": _ints(traj.response_ids),
        "step_map": _ints(traj.step_map),
        "logprobs": [float(x) for x in traj.logprobs.reshape(-1).float().tolist()],
        "valid_length": int(traj.valid_length),
        "nfe": int(traj.nfe),
        "finish_reason": traj.finish_reason,
        "response_text": extra.get("response_text"),
        "reward": None if reward is None else float(reward),
        "reason": extra.get("reason"),
        "advantage": None if advantage is None else float(advantage),
        "reward_metrics": _json(extra.get("reward_metrics", {})),
        "sampling": _json(traj.sampling),
    }


class TrajectoryStore:
    """Append-only Parquet log of scored trajectories plus a bounded in-memory window by policy version."""

    def __init__(self, root: str | os.PathLike, *, max_items: int = 4096):
        if max_items < 1:
            raise StoreError(f"store: max_items must be >= 1, got {max_items}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_items = int(max_items)
        self._by_version: OrderedDict[int, list[Trajectory]] = OrderedDict()
        self._in_memory = 0
        self._files: list[str] = sorted((p.name for p in self.root.iterdir() if _FILE.match(p.name)), key=_file_key)
        self._rows = sum(pq.read_metadata(self.root / name).num_rows for name in self._files)
        for stale in stale_temporaries(self.root, "*.parquet"):  # a crash between write and rename
            stale.unlink()

    # ---------------------------------------------------------------------------------------------- writing
    def add(self, step: int, trajectories: Iterable[Trajectory]) -> str:
        """Persist one batch (fsynced, atomic) and keep it in memory; returns the file name."""
        trajectories = list(trajectories)
        rows = [trajectory_row(step, t) for t in trajectories]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        name = self._next_name(step)
        with atomic_output(self.root / name) as tmp:
            pq.write_table(table, tmp)
        self._files.append(name)
        self._rows += len(rows)
        for traj in trajectories:
            self._by_version.setdefault(int(traj.policy_version), []).append(traj)
            self._in_memory += 1
        self._evict()
        return name

    def _next_name(self, step: int) -> str:
        base = f"step_{step:06d}"
        if not (self.root / f"{base}.parquet").exists():
            return f"{base}.parquet"
        part = 1
        while (self.root / f"{base}-{part}.parquet").exists():
            part += 1
        return f"{base}-{part}.parquet"

    def _evict(self) -> None:
        while self._in_memory > self.max_items and len(self._by_version) > 1:
            _, dropped = self._by_version.popitem(last=False)
            self._in_memory -= len(dropped)
        if self._in_memory > self.max_items:  # one version larger than the window: keep its newest items
            version, items = next(iter(self._by_version.items()))
            self._by_version[version] = items[-self.max_items:]
            self._in_memory = len(self._by_version[version])

    # ---------------------------------------------------------------------------------------------- reading
    def get(self, version: int | None = None, min_version: int | None = None) -> list[Trajectory]:
        """In-memory trajectories of one version, of every version >= min_version, or all kept."""
        if version is not None:
            return list(self._by_version.get(int(version), []))
        return [t for v, items in self._by_version.items() if min_version is None or v >= min_version
                for t in items]

    def versions(self) -> list[int]:
        return list(self._by_version)

    def files(self) -> list[Path]:
        return [self.root / name for name in self._files]

    def summary(self) -> dict[str, Any]:
        return {"files": len(self._files), "rows": self._rows, "in_memory": self._in_memory,
                "versions": self.versions()}

    # ----------------------------------------------------------------------------------------------- cursor
    def state_dict(self) -> dict[str, Any]:
        return {"files": list(self._files), "rows": self._rows}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Rewind to a checkpoint's cursor: its files must all be here; later ones move to superseded/.

        The in-memory window starts empty (the learner never reads back across a resume). Returns the names of
        the files moved aside.
        """
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
        self._by_version.clear()
        self._in_memory = 0
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


def store_actor(root: str | os.PathLike, *, max_items: int = 4096, **options):
    """The store as a Ray actor (thin: the same methods, called with `.remote`). Options go to `.options()`."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(TrajectoryStore)
    return actor_cls.options(**options).remote(str(root), max_items=max_items)
