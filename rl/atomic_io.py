"""Writing files and directories so that a crash never leaves half of one under its final name.

    atomic_write(run_dir / "run.json", text)               # a whole file at once (str or bytes)
    with atomic_output(root / "step.parquet") as tmp:       # a writer that takes a path: a file or a directory
        pq.write_table(table, tmp)
    replace_dir(tmp_dir, final_dir)                         # a finished directory into place, over an older one
    fsync_path(path, recursive=True)                        # a file's data, or a directory's entries, to disk

Each writes under a hidden temporary name in the destination's folder (so the rename stays on one filesystem),
fsyncs the data, renames it into place (os.replace / os.rename: atomic on POSIX) and fsyncs the folder, so the rename
itself survives a power loss. A failure removes the temporary and re-raises. Standard library only; rl/ is the
lowest layer that writes run state (checkpoints, the store, task data), launch/ uses the same helpers.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "atomic_write", "fsync_path", "replace_dir", "stale_temporaries", "temporary_name"]


def fsync_path(path: str | os.PathLike, *, recursive: bool = False) -> None:
    """Flush a file's data or a directory's entries to disk; `recursive`: everything under a directory too."""
    root = Path(path)
    paths = [*sorted(root.rglob("*")), root] if recursive and root.is_dir() else [root]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden temporary beside `path` that atomic_output writes: `.NAME.tmp` (each file has one writer)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def stale_temporaries(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Temporaries a crashed writer left in `folder` for names matching `pattern` (never a finished file)."""
    return sorted(Path(folder).glob(f".{pattern}.tmp"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished directory `tmp` to `final`; an existing `final` is moved aside first and deleted only
    once the new one is in place, so `final` is always either the old directory or the new one."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp")  # a stale temporary if we crash now
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for the body to write (a file or a directory); on success it is fsynced and renamed
    to `path` (replacing what was there), on failure removed."""
    path = Path(path)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        _plain_modes(tmp)
        if tmp.is_dir():
            fsync_path(tmp, recursive=True)
            replace_dir(tmp, path)
        else:
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; else the set-and-restore idiom)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # no procfs (not Linux): the set-and-restore idiom below
        lines = []
    for line in lines:
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_modes(tmp: Path) -> None:
    """Give every regular file under `tmp` the mode a plain open() would (0o666 minus the umask): writers that go
    through a private temporary (safetensors, mkstemp: 0600) would otherwise leave a run readable by its owner only,
    unlike the rest of it. Executable bits and modes already wider are left alone."""
    if tmp.is_symlink() or not tmp.exists():
        return
    plain = 0o666 & ~_umask()
    for p in [*tmp.rglob("*"), tmp] if tmp.is_dir() else [tmp]:
        if p.is_file() and not p.is_symlink():
            mode = p.stat().st_mode & 0o777
            if mode | plain != mode:
                p.chmod(mode | plain)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically and durably."""
    with atomic_output(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
