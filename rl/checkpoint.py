"""Checkpoints: everything a run needs to continue exactly, written atomically, the last K kept.

    runs/NAME/checkpoints/
        step_000004/
            policy/            HF directory (save_policy: safetensors, config, tokenizer; TraDo/SDAR format kept)
            learner/           one shard per learner rank, each written and read by its rank (rl.learner_shards;
                               nothing of it passes through the driver): layout.json (world size, backend, ZeRO
                               stage), rank_00000.pt ... (torch.save of the rank's Learner.state_dict(): update
                               counters; with the torch backend also the optimizer, the value model and the LoRA
                               adapters), and with DeepSpeed its own checkpoint of every rank (zero/: optimizer
                               shard and fp32 masters per rank, module state). A LoRA run resumes on its initial
                               policy plus the saved adapters (policy/ holds the merged weights).
            rng.json           RNG states: python, numpy, torch globals and every generator the caller names
            state.json         step, weight version, data cursor, store cursor, driver counters
            recipe.yaml        the validated recipe the run was started with
            manifest.json      written last: format, step, every file's size and the SHA-256 of the small ones
                               (the learner ranks hash their own files and hand the driver only these entries)
        latest                 "step_000004": a pointer file, replaced atomically

    path = save_checkpoint(ckpt_root, step, writers={...}, state={...}, rng=..., recipe_yaml=..., keep_last=3)
    ckpt = load_checkpoint(resolve_checkpoint(run_dir))  # -> Checkpoint (validated against its manifest)

Format 1 (before per-rank shards) kept every rank's learner state in one learner.pt that the driver wrote; it
still loads (Checkpoint.legacy_learner_file) for a one-rank torch-backend learner (what CPU runs use); a DeepSpeed
one gets a one-line CheckpointError (its optimizer layout was diffrl's own, replaced by DeepSpeed's checkpoint files).

A checkpoint is assembled in a hidden temp directory and renamed into place in one step, so a crash leaves either
the previous set of checkpoints or the new one, never half of one. A checkpoint that fails its manifest (missing or
truncated file, bad JSON) raises CheckpointError with one line naming the file.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from rl.atomic_io import atomic_write, fsync_path, replace_dir, stale_temporaries
from rollout.errors import OneLineError

__all__ = ["CheckpointError", "Checkpoint", "WrittenFiles", "save_checkpoint", "load_checkpoint",
           "resolve_checkpoint", "list_checkpoints", "capture_rng", "restore_rng", "file_entry", "FORMAT"]

FORMAT = 2  # 2: learner/ holds per-rank shards; 1: learner.pt written by the driver (still read, see above)
READABLE_FORMATS = (1, 2)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_LIMIT = 64 * 1024 * 1024  # files up to this size are hashed; larger ones (weights) are checked by size


class CheckpointError(OneLineError):
    """A checkpoint that cannot be used; one line naming the file."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # state.json: version, data cursor, store cursor, driver counters
    rng: dict[str, Any]  # rng.json (restore with restore_rng)
    recipe_yaml: str

    @property
    def policy_dir(self) -> Path:
        return self.path / "policy"

    @property
    def learner_dir(self) -> Path:
        """The learner ranks' shards (format 2); the ranks read it themselves."""
        return self.path / "learner"

    @property
    def legacy_learner_file(self) -> Path | None:
        """learner.pt of a format-1 checkpoint (the learner state the driver wrote), else None."""
        path = self.path / "learner.pt"
        return path if path.is_file() and not self.learner_dir.is_dir() else None


@dataclass
class WrittenFiles:
    """What a writer that runs in other processes (the learner ranks) wrote into its folder: {path relative to the
    folder: file_entry(...)}, computed where the files were written, so the driver never reads them; plus small
    JSON-able facts about them (meta)."""

    files: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------- RNG
def _torch_state(gen: torch.Generator) -> dict[str, Any]:
    return {"type": "torch", "device": str(gen.device), "state": base64.b64encode(
        gen.get_state().numpy().tobytes()).decode()}


def _encode(obj: Any) -> dict[str, Any]:
    if isinstance(obj, torch.Generator):
        return _torch_state(obj)
    if isinstance(obj, np.random.Generator):
        return {"type": "numpy", "state": obj.bit_generator.state}
    if isinstance(obj, random.Random):
        version, internal, gauss = obj.getstate()
        return {"type": "python", "state": [version, list(internal), gauss]}
    raise CheckpointError(f"rng: cannot checkpoint a {type(obj).__name__} (torch/numpy Generator, random.Random)")


def capture_rng(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able RNG states: the process-global python/numpy/torch ones and each named generator."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "generators": {name: _encode(gen) for name, gen in (generators or {}).items()},
    }
    return out


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> None:
    """Put every captured state back: globals, then each named generator (which must exist on both sides)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    saved = state.get("generators", {})
    generators = dict(generators or {})
    if set(saved) != set(generators):
        raise CheckpointError(f"rng.json: generators {sorted(saved)} != the run's {sorted(generators)}")
    for key, gen in generators.items():
        entry = saved[key]
        if isinstance(gen, torch.Generator):
            gen.set_state(torch.frombuffer(bytearray(base64.b64decode(entry["state"])), dtype=torch.uint8))
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = entry["state"]
        elif isinstance(gen, random.Random):
            v, internal, g = entry["state"]
            gen.setstate((v, tuple(internal), g))


# ------------------------------------------------------------------------------------------------------ save
def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """A manifest entry: the size, and the SHA-256 of files up to the hash limit (larger ones are checked by size)."""
    size = Path(path).stat().st_size
    return {"size": size, **({"sha256": _sha256(Path(path))} if size <= _HASH_LIMIT else {})}


def _manifest(root: Path, described: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every file's entry; `described` files (written elsewhere, entries computed there) are only stat'ed."""
    files = {}
    for rel in described:
        if not (root / rel).is_file():
            raise CheckpointError(f"{root / rel}: described by its writer but not on disk")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if rel == "manifest.json":
            continue
        entry = described.get(rel)
        if entry is None:
            files[rel] = file_entry(path)
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes on disk, its writer reported {entry['size']}")
        files[rel] = dict(entry)
    return files


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    *,
    writers: Mapping[str, Callable[[Path], Any]],
    state: Mapping[str, Any],
    rng: Mapping[str, Any],
    recipe_yaml: str,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` under ckpt_root and point `latest` at it; returns its path.

    writers: {"policy": fn(dir), "learner": fn(dir), ...}: each fills the (not yet published) folder of its name,
    itself or through the processes it drives; one that returns WrittenFiles has its files' manifest entries
    computed by those processes (its meta is ignored here).
    state: JSON-able (version, data and store cursors, counters). rng: from capture_rng().
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-*"), *stale_temporaries(root)]:  # a crash while writing: never a checkpoint
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        described: dict[str, dict[str, Any]] = {}
        for name, write in writers.items():
            (tmp / name).mkdir()
            written = write(tmp / name)
            if isinstance(written, WrittenFiles):
                described.update({f"{name}/{rel}": entry for rel, entry in written.files.items()})
        _write_json(tmp / "rng.json", dict(rng))
        _write_json(tmp / "state.json", {"step": int(step), **dict(state)})
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        _write_json(tmp / "manifest.json", {"format": FORMAT, "step": int(step), "time": time.time(),
                                             "files": _manifest(tmp, described)})
        fsync_path(tmp, recursive=True)
        replace_dir(tmp, final)  # over an existing one: a replayed step after resuming from an older checkpoint
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(root, final.name)
    _prune(root, keep_last, keep=final.name)
    return final


def _write_pointer(root: Path, name: str) -> None:
    atomic_write(root / "latest", name + "\n")


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = list_checkpoints(root)
    for path in steps[:-keep_last] if keep_last > 0 else []:
        if path.name != keep:
            shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------------ load
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, its checkpoints/ folder or one checkpoint -> the checkpoint directory to load."""
    path = Path(path)
    if (path / "manifest.json").exists() or _STEP_DIR.match(path.name):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{pointer}: corrupt pointer {name[:40]!r}")
        if not (root / name).is_dir():
            raise CheckpointError(f"{pointer}: points at {name}, which does not exist")
        return root / name
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    raise CheckpointError(f"{path}: no checkpoint yet (no {root / 'latest'})")


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, or a one-line CheckpointError naming it (missing / corrupt)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (corrupt or incomplete checkpoint)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt JSON ({err})") from None


def verify_checkpoint(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest."""
    manifest = read_json(path / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS or "files" not in manifest:
        raise CheckpointError(f"{path / 'manifest.json'}: not a diffrl checkpoint manifest (format "
                              f"{' or '.join(map(str, READABLE_FORMATS))})")
    for rel, info in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (corrupt checkpoint)")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{file}: {size} bytes, manifest says {info['size']} (corrupt checkpoint)")
        if hashes and "sha256" in info and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 differs from the manifest (corrupt checkpoint)")
    return manifest


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate a checkpoint directory against its manifest and read its small files."""
    path = resolve_checkpoint(path)
    manifest = verify_checkpoint(path)
    state = read_json(path / "state.json")
    rng = read_json(path / "rng.json")
    for key in ("step", "data", "store"):
        if key not in state:
            raise CheckpointError(f"{path / 'state.json'}: no {key!r} entry")
    if int(state["step"]) != int(manifest["step"]):
        raise CheckpointError(f"{path / 'state.json'}: step {state['step']} != manifest step {manifest['step']}")
    if not (path / "policy" / "config.json").is_file():
        raise CheckpointError(f"{path / 'policy'}: no policy (config.json missing)")
    return Checkpoint(path, int(state["step"]), state, rng, (path / "recipe.yaml").read_text())
