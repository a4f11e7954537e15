"""Per-rank learner checkpoint shards: each learner rank writes and reads its own state in the checkpoint's (not yet
published) learner/ folder, on a path every rank sees (the run directory), so no optimizer tensor ever passes
through the driver; the driver gets file entries (sizes, hashes) and the layout, nothing else.

    learner/
        layout.json        rank 0: {"format", "world_size", "backend", "zero_stage"} (checked before any rank loads)
        rank_00000.pt      each rank: torch.save of its Learner.state_dict() with its rank and world size
                           (torch backend: the optimizer state, value model, adapters; DeepSpeed: counters only)
        zero/              DeepSpeed only: its own checkpoint (engine.save_checkpoint, tag "zero"), one optimizer
                           shard + fp32 masters per rank, the module state (rank 0; under ZeRO-3 one per rank)

    files = save_rank_shard(learner, folder, rank, world_size)   # every rank -> its share of the file entries
    check_layout(folder, world_size=2, backend="deepspeed", zero_stage=3)   # the driver, before the ranks load
    check_resumable(ckpt, world_size=2, backend="deepspeed", zero_stage=3)  # preflight, before Ray starts
    load_rank_shard(learner, folder, rank, world_size)           # every rank, into a freshly built learner

Under DeepSpeed both calls are collective (every rank calls them together). A missing or unreadable shard, or a
layout other than the learner's, raises CheckpointError with one line naming the file.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from rl.checkpoint import CheckpointError, file_entry, read_json
from rollout.errors import one_line

LAYOUT_FILE = "layout.json"
SHARD_FORMAT = 1


class PeerShardError(CheckpointError):
    """This rank's shard was fine but another rank's was not (that rank raises the error that names the file)."""


def shard_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def learner_layout(learner, world_size: int) -> dict[str, Any]:
    backend = learner.config.backend
    return {"format": SHARD_FORMAT, "world_size": int(world_size), "backend": backend,
            "zero_stage": int(learner.config.zero_stage) if backend == "deepspeed" else None}


def _all_ranks_ok(ok: bool, world_size: int) -> bool:
    """True when every rank says ok (a rank that cannot read its shard must not leave the others waiting inside a
    collective load)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return ok
    nccl = dist.get_backend() == "nccl"  # NCCL reduces device tensors only
    flag = torch.tensor([int(ok)], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def describe_share(folder: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Manifest entries of this rank's share of every file under folder (the ranks split the hashing; call once
    every rank's files are complete)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): file_entry(p) for p in files[rank::world_size]}


def save_rank_shard(learner, folder: str | Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Write this rank's state into folder (its backend's own files first: collective under DeepSpeed); returns
    the manifest entries of this rank's share of the folder's files. No tensor leaves the rank."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    learner.backend.save_files(folder)
    path, error = folder / shard_name(rank), None
    try:
        torch.save({"rank": int(rank), "world_size": int(world_size), "learner": learner.state_dict()}, path)
        if rank == 0:
            (folder / LAYOUT_FILE).write_text(json.dumps(learner_layout(learner, world_size), sort_keys=True) + "\n")
    except (OSError, RuntimeError) as err:  # a full disk, a quota (torch.save's writer raises RuntimeError): this
        # rank still joins the agreement below, or the others wait for it
        error = CheckpointError(f"{path}: could not be written ({type(err).__name__}: {one_line(str(err), 200)})")
    # Every rank's files are complete before any rank lists them, and a rank that could not write fails them all
    # at once (a bare barrier would keep the others waiting for it until the group's timeout).
    if not _all_ranks_ok(error is None, world_size):
        raise error or PeerShardError(f"{folder}: another learner rank could not write its shard")
    return describe_share(folder, rank, world_size)


def check_layout(folder: str | Path, *, world_size: int, backend: str, zero_stage: int | None) -> dict[str, Any]:
    """The saved layout against the learner about to load it: one line naming layout.json on a mismatch."""
    path = Path(folder) / LAYOUT_FILE
    layout = read_json(path)
    if not isinstance(layout, dict) or layout.get("format") != SHARD_FORMAT:
        raise CheckpointError(f"{path}: not a learner shard layout (format {SHARD_FORMAT})")
    want = {"world_size": world_size, "backend": backend, "zero_stage": zero_stage if backend == "deepspeed" else None}
    for key, value in want.items():
        if layout.get(key) != value:
            raise CheckpointError(f"{path}: saved with learner {key} {layout.get(key)}, this run has {value} "
                                  f"(resume with the same learner.num_workers, backend and zero_stage)")
    return layout


def check_resumable(ckpt, *, world_size: int, backend: str, zero_stage: int | None) -> None:
    """Whether a learner of this shape can resume checkpoint `ckpt` (rl.checkpoint.Checkpoint), checked before any
    learner is built: its shards' layout, or for a format-1 checkpoint's learner.pt a one-rank torch learner."""
    if ckpt.learner_dir.is_dir():
        check_layout(ckpt.learner_dir, world_size=world_size, backend=backend, zero_stage=zero_stage)
    elif ckpt.legacy_learner_file is not None:
        _check_legacy_fits(ckpt.legacy_learner_file, world_size, backend)
    else:
        raise CheckpointError(f"{ckpt.learner_dir}: missing (corrupt checkpoint)")


def _check_legacy_fits(path: Path, world_size: int, backend: str) -> None:
    if world_size != 1 or backend != "torch":
        raise CheckpointError(f"{path}: learner state of an older diffrl (one file written by the driver); it "
                              f"resumes only a one-rank torch learner, this run has {world_size} {backend} rank(s)")


def _read_shard(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (corrupt checkpoint)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable learner shard ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or "learner" not in saved:
        raise CheckpointError(f"{path}: not a learner shard")
    if (saved.get("rank"), saved.get("world_size")) != (rank, world_size):
        raise CheckpointError(f"{path}: shard of rank {saved.get('rank')} of {saved.get('world_size')}, expected "
                              f"rank {rank} of {world_size}")
    return saved


def load_rank_shard(learner, folder: str | Path, rank: int, world_size: int) -> None:
    """Restore this rank's learner from its shard (and the backend's own files: collective under DeepSpeed)."""
    folder = Path(folder)
    path = folder / shard_name(rank)
    try:
        saved, error = _read_shard(path, rank, world_size), None
    except CheckpointError as err:
        saved, error = None, err
    if not _all_ranks_ok(error is None, world_size):
        raise error or PeerShardError(f"{folder}: another learner rank could not read its shard")
    try:
        learner.load_state_dict(saved["learner"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        learner.backend.load_files(folder)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AssertionError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{folder}: the backend could not load its checkpoint files "
                              f"({type(err).__name__}: {err})") from None


def load_legacy_state(learner, path: str | Path, world_size: int) -> None:
    """A format-1 learner.pt (every rank's state, written by the driver): one-rank torch learners only."""
    path = Path(path)
    _check_legacy_fits(path, world_size, learner.config.backend)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable learner state ({type(err).__name__}: {err})") from None
    saved = saved if isinstance(saved, dict) else {}
    ranks = saved.get("ranks")
    if saved.get("world_size") != 1 or not isinstance(ranks, list) or len(ranks) != 1:
        raise CheckpointError(f"{path}: not the learner state of one torch-backend rank")
    try:
        learner.load_state_dict(ranks[0])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from None
