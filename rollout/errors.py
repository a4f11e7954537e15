"""One-line errors: bad input (a recipe key, a data file, a checkpoint, a reward spec) is reported as a single line
naming the field or file, which the CLI prints after `diffrl: error:`, never as a multi-line message.

    raise CheckpointError(f"{path}: unreadable learner state ({err})")   # CheckpointError(OneLineError)
    log.warning("worker died: %s", one_line(err, 200))

Standard library only, at the bottom of every import chain: launch, rl and rollout import it, and so does rewards/
(a separate package that imports nothing else of diffrl): importing this module pulls in nothing of the model
layer (rollout/__init__.py is empty), and nothing here imports back, so every import still points down.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["OneLineError", "one_line", "strip_ansi"]

# Terminal escape sequences (colours, cursor moves): Ray's task errors carry them, and a stored or printed one-line
# error must not (`diffrl status` would show coloured fragments).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: Any) -> str:
    """`text` without terminal escape sequences."""
    return _ANSI.sub("", str(text))


def one_line(text: Any, limit: int | None = None) -> str:
    """`text` without terminal escape sequences, every run of whitespace (newlines included) collapsed to one
    space, cut to `limit` characters (the last three being "...") when given."""
    flat = " ".join(strip_ansi(text).split())
    if limit is None or len(flat) <= limit:
        return flat
    return flat[: max(0, limit - 3)] + "..."


class OneLineError(ValueError):
    """Bad input, reported in one line (of at most `limit` characters when a subclass sets it)."""

    limit: int | None = None

    def __init__(self, message: Any = ""):
        super().__init__(one_line(message, self.limit))
