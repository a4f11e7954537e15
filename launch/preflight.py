"""Pre-flight checks: everything about a run's inputs that can be found wrong before Ray starts, each reported as
one line naming the file or field (`PreflightError`), and the claim on the run directory.

    check_run_inputs(recipe, resume=None)            # all of the below that the recipe names
    check_checkpoint_dir(path, where="model.path")   # config.json, every weights file whole, tokenizer + mask token
    check_safetensors(file)                          # header length, header JSON, data size == the offsets' end
    scan_data_file(path, "prompt", "answer", where="data.train")   # non-empty, every row parseable, fields there
    claim = claim_run_dir(run_dir)                   # exclusive, race-free; released at the run's end

Nothing here writes anything except `claim_run_dir`, which creates the run directory (or uses an existing one) and
holds an exclusive lock on `RUN_DIR/.lock` for as long as the run lives: two `diffrl train` into one directory,
however close together, and exactly one gets it. The lock is an `flock`, so a run killed with SIGKILL leaves no
stale claim behind. Standard library only at import time (transformers is imported only to load a tokenizer).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rollout.errors import OneLineError, one_line

__all__ = ["PreflightError", "check_run_inputs", "check_checkpoint_dir", "check_safetensors", "scan_data_file",
           "RunDirClaim", "claim_run_dir", "LOCK_NAME"]

LOCK_NAME = ".lock"
_MAX_HEADER = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB


class PreflightError(OneLineError):
    """An input found unusable before the run starts; one line naming the field and the file."""


# ------------------------------------------------------------------------------------------------- checkpoints
def check_safetensors(path: Path) -> None:
    """Raise PreflightError unless `path` is a whole safetensors file: an 8-byte little-endian header length, that
    many bytes of JSON mapping tensor names to `data_offsets`, then exactly as many data bytes as the largest
    offset says. Reads the header only, never the tensors, so a multi-GB checkpoint is checked in milliseconds."""
    size = path.stat().st_size
    if size < 8:
        raise PreflightError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header "
                             "length)")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise PreflightError(f"{path}: truncated or not safetensors (header length {header_len}, file holds "
                                 f"{size} bytes)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreflightError(f"{path}: unreadable safetensors header ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise PreflightError(f"{path}: unreadable safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise PreflightError(f"{path}: tensor {name!r}: bad data_offsets {offsets!r} in the header")
        end = max(end, offsets[1])
    data = size - 8 - header_len
    if data != end:
        state = "truncated" if data < end else "has trailing bytes"
        raise PreflightError(f"{path}: {state}: the header's offsets need {end} bytes of tensor data, the file "
                             f"holds {data}")


def _check_weights(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise PreflightError(f"{index}: names {shard}, which is missing")
    files = sorted(path.glob("*.safetensors"))
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not files and not bins:
        raise PreflightError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    for file in files:
        check_safetensors(file)
    for file in bins:  # torch.save's zip format: the central directory sits at the end, so a cut file fails here
        if not zipfile.is_zipfile(file):
            raise PreflightError(f"{file}: truncated or not a torch checkpoint (no zip directory at its end)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreflightError(f"{path}: unreadable JSON ({type(err).__name__}: {one_line(err, 120)})") from None
    if not isinstance(data, dict):
        raise PreflightError(f"{path}: expected a JSON object")
    return data


def check_checkpoint_dir(path: str | os.PathLike, *, where: str = "model.path", tokenizer: bool = True,
                         trust_remote_code: bool = False) -> None:
    """A checkpoint directory a run can start from: config.json parseable, every weights file whole and, with
    `tokenizer`, a tokenizer that loads and has a mask token. Each failure: PreflightError `WHERE: FILE: why`."""
    path = Path(path)
    try:
        if not path.is_dir():
            raise PreflightError(f"{path}: no such directory")
        if not (path / "config.json").is_file():
            raise PreflightError(f"{path / 'config.json'}: missing")
        config = _read_json(path / "config.json")
        sidecar_path = path / "diffrl.json"
        sidecar = _read_json(sidecar_path) if sidecar_path.exists() else {}
        _check_weights(path)
        if tokenizer:
            _check_tokenizer(path, config, sidecar, trust_remote_code)
    except PreflightError as err:
        raise PreflightError(f"{where}: {err}") from None


def _check_tokenizer(path: Path, config: dict, sidecar: dict, trust_remote_code: bool) -> None:
    from rollout.models.loading import _load_tokenizer, find_mask_token_id
    from rollout.models.spec import ModelLoadError

    try:
        tok = _load_tokenizer(path, trust_remote_code)
        if str(config.get("model_type", "")) == "diffusion_gemma":
            return  # no mask token: its canvas starts from random tokens (rollout/models/families/diffusion_gemma.py)
        find_mask_token_id(tok, config, sidecar, path)
    except ModelLoadError as err:
        raise PreflightError(str(err)) from None


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class _Rows:
    """What a scan saw: rows, the fields any object row had, the bad rows and where the first one is."""

    count: int = 0
    fields: set = field(default_factory=set)
    bad: int = 0
    first_bad: str = ""

    def add(self, row, where: str, prompt_field: str, answer_field: str) -> None:
        self.count += 1
        if isinstance(row, dict):
            self.fields.update(row)
        problem = _row_problem(row, prompt_field, answer_field)
        if problem:
            self.bad_row(where, problem)

    def bad_row(self, where: str, why: str) -> None:
        self.bad += 1
        if not self.first_bad:
            self.first_bad = f"{where}: {why}"


def _row_problem(row, prompt_field: str, answer_field: str) -> str | None:
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    prompt, answer = row.get(prompt_field), row.get(answer_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return f"field {prompt_field!r} is missing or not a non-empty string (data.prompt_field)"
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return f"no answer (field {answer_field!r} missing or empty; data.answer_field)"
    return None


def scan_data_file(path: str | os.PathLike, prompt_field: str, answer_field: str, *,
                   where: str = "data.train") -> int:
    """Check a data file without loading it into `datasets`: not empty, every row parseable with the prompt and
    answer fields the recipe names. Returns the number of rows; raises PreflightError with the count of bad rows
    and the first one's line number (JSONL) or index (JSON), or the missing column (Parquet)."""
    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"{where}: {path}: no such file")
    if path.stat().st_size == 0:
        raise PreflightError(f"{where}: {path}: empty file (no rows)")
    seen = _Rows()
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    seen.count += 1
                    seen.bad_row(f"line {number}", f"not valid JSON ({err.msg})")
                    continue
                seen.add(row, f"line {number}", prompt_field, answer_field)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PreflightError(f"{where}: {path}: not valid JSON ({type(err).__name__}: {one_line(err, 120)})"
                                 ) from None
        if not isinstance(data, list):  # other layouts (columns, nested) are left to the datasets loader
            return -1
        for i, row in enumerate(data):
            seen.add(row, f"row {i}", prompt_field, answer_field)
    elif path.suffix == ".parquet":
        return _scan_parquet(path, prompt_field, answer_field, where)
    else:
        raise PreflightError(f"{where}: {path}: unsupported file type {path.suffix!r} (.jsonl, .json, .parquet)")
    if seen.count == 0:
        raise PreflightError(f"{where}: {path}: no rows")
    if seen.fields:  # a field no row has is a misnamed column, not bad rows
        _check_columns(seen.fields, prompt_field, answer_field, where, path)
    if seen.bad:
        raise PreflightError(f"{where}: {path}: {seen.bad} of {seen.count} rows unusable; first at "
                             f"{seen.first_bad}")
    return seen.count


def _check_columns(names: set, prompt_field: str, answer_field: str, where: str, path: Path) -> None:
    for key, wanted in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
        if wanted not in names:
            raise PreflightError(f"{where}: {path}: no column {wanted!r} ({key}; columns: "
                                 f"{', '.join(sorted(map(str, names))) or 'none'})")


def _scan_parquet(path: Path, prompt_field: str, answer_field: str, where: str) -> int:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise PreflightError(f"{where}: {path}: unreadable Parquet ({one_line(err, 160)})") from None
    _check_columns(set(meta.schema.to_arrow_schema().names), prompt_field, answer_field, where, path)
    if meta.num_rows == 0:
        raise PreflightError(f"{where}: {path}: no rows")
    return int(meta.num_rows)


# ------------------------------------------------------------------------------------------------- a recipe
def check_run_inputs(recipe, resume=None) -> None:
    """The inputs a run reads, checked without writing anything: the model checkpoint (config, every weights
    file whole, tokenizer with a mask token), the resumed checkpoint's and the value model's weights, the data
    files (non-empty, every row parseable with the recipe's fields). One PreflightError line per problem.
    `recipe` is a launch.recipe.Recipe (its paths relative to the working directory or absolute), `resume` a
    rl.checkpoint.Checkpoint or None."""
    if recipe.model.tiny is None and recipe.model.path:
        check_checkpoint_dir(recipe.model.path, where="model.path", trust_remote_code=recipe.model.trust_remote_code)
    if resume is not None:
        check_checkpoint_dir(resume.policy_dir, where="checkpoint", tokenizer=False)
        from rl.learner_shards import check_resumable  # learner shards saved by as many ranks of the same kind

        ln = recipe.learner
        check_resumable(resume, world_size=ln.num_workers, backend=ln.backend,
                        zero_stage=2 if ln.zero_stage is None else ln.zero_stage)
    value_model = getattr(recipe.algorithm, "value_model", None)
    if value_model is not None and value_model.path:
        check_checkpoint_dir(value_model.path, where="algorithm.value_model.path", tokenizer=False)
    data = recipe.data
    if data.task is None:
        files = [("data.train", data.train)] + ([("data.eval", data.eval)] if recipe.trainer.eval_every else [])
        for where, path in files:
            if path is not None:
                scan_data_file(path, data.prompt_field, data.answer_field, where=where)


# ------------------------------------------------------------------------------------------------ run directory
@dataclass
class RunDirClaim:
    """The held claim on a run directory: release() at the run's end; abandon() when preparation fails, which
    removes the directory if this claim created it (else only the paths listed in `created`)."""

    run_dir: Path
    made_dir: bool
    fd: int | None
    created: list[Path] = field(default_factory=list)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def abandon(self) -> None:
        try:
            if self.made_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            else:
                for path in self.created:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    elif path.exists():
                        path.unlink()
        finally:
            self.release()


def claim_run_dir(run_dir: str | os.PathLike) -> RunDirClaim:
    """Create `run_dir` (or take an existing one) and hold an exclusive lock on RUN_DIR/.lock; another live
    process holding it is a PreflightError naming output_dir. Race-free: mkdir and flock are atomic, and a lock
    file that a failing run removed while we waited is detected by its inode and refused."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(run_dir)
        made = True
    except FileExistsError:
        if not run_dir.is_dir():
            raise PreflightError(f"output_dir: {run_dir}: exists and is not a directory") from None
        made = False
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise PreflightError(f"output_dir: {run_dir}: removed by another diffrl process while claiming it; "
                             "try again") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PreflightError(f"output_dir: {run_dir}: in use by another diffrl run (it holds {lock}); pick "
                                 "another name/output_dir or wait for it to end") from None
        raise
    try:
        same = os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise PreflightError(f"output_dir: {run_dir}: removed by another diffrl process while claiming it; "
                             "try again")
    fresh = os.fstat(fd).st_size == 0  # created now: a claiming run writes its pid into it
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunDirClaim(run_dir, made, fd, [lock] if fresh and not made else [])
