"""Writing a saved checkpoint's config.json beside the source checkpoint's own code files (every family's save)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_config_and_code(config: dict, out_dir: Path, source_dir: str | Path | None, *,
                          also: tuple[str, ...] = ()) -> None:
    """Write `config` as out_dir/config.json and copy the source checkpoint's *.py files (and the files named in
    `also`, where present) beside it, so a checkpoint saved from a remote-code model still loads the same way;
    nothing is copied when out_dir is the source itself."""
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source_dir and Path(source_dir).resolve() != out_dir.resolve():
        for code in [*Path(source_dir).glob("*.py"), *(Path(source_dir) / name for name in also)]:
            if code.is_file():
                shutil.copy2(code, out_dir / code.name)
