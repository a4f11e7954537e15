"""Every file a run starts with has the mode a plain open() gives (0644 under umask 022), recipe.yaml and the
safetensors weights included (safetensors writes through a 0600 temporary)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from launch.driver_setup import prepare_run
from launch.recipe import load_recipe
from rl.atomic_io import atomic_output

REPO = Path(__file__).resolve().parents[2]


def test_a_prepared_run_is_readable_by_group_and_others(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        ctx = prepare_run(load_recipe(REPO / "recipes" / "tiny-tracerl.yaml", [f"output_dir={run}"]))
        ctx.claim.release()
        modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
        assert "recipe.yaml" in modes and "model_init/model.safetensors" in modes
        assert {name: oct(m) for name, m in modes.items() if m != 0o644} == {}
    finally:
        os.umask(old)


def test_atomic_output_widens_a_private_temporary_to_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "f.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as mkstemp does
            os.close(fd)
        assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640
    finally:
        os.umask(old)
