"""The shared file helpers (rl/atomic_io.py) and the one-line error helper (rollout/errors.py)."""
from __future__ import annotations

import pytest

from rl.atomic_io import atomic_output, atomic_write, replace_dir, stale_temporaries
from rollout.errors import OneLineError, one_line


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    atomic_write(path, "old\n")
    atomic_write(path, b"new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write(path, "kept")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_directories_replace_an_older_one_whole(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.bin").write_text("old")
    with atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    other = tmp_path / "other"
    other.mkdir()
    replace_dir(other, tmp_path / "fresh")  # no older one
    assert (tmp_path / "fresh").is_dir() and not other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fresh"]


def test_stale_temporaries_are_only_temporaries(tmp_path):
    (tmp_path / ".step_1.parquet.tmp").write_text("half")
    (tmp_path / "step_2.parquet").write_text("done")
    (tmp_path / ".notes").write_text("x")
    assert [p.name for p in stale_temporaries(tmp_path, "*.parquet")] == [".step_1.parquet.tmp"]


def test_one_line():
    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line("x" * 10, 6) == "xxx..."
    assert one_line("short", 6) == "short"

    class Bad(OneLineError):
        limit = 8

    assert str(OneLineError("field:\n  broken")) == "field: broken"
    assert str(Bad("a long message")) == "a lon..."
    assert isinstance(Bad("x"), ValueError)
