"""Hostile config.json values, refused with one line naming the file and field before any model is built.

A checkpoint directory is untrusted input. Its config.json decides how large a model diffrl constructs (even on the
meta device, a million layers or a billion experts is a million / billion modules: the load never returns), and
wrong types surface deep inside transformers as tracebacks (a string `hidden_size`, `n_group: 0`). The families'
loaders therefore (1) check the numeric fields they read, (2) bound the layer and expert counts by the tensors the
weights files actually hold (safetensors headers only: cheap), and (3) turn whatever transformers still raises
while parsing the config or building the model skeleton into a ModelLoadError naming config.json.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from rollout.models.spec import ModelLoadError


def _config_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import StrictDataclassError  # transformers 5's config validation

    return (TypeError, ValueError, ZeroDivisionError, AttributeError, KeyError, IndexError, RuntimeError,
            OverflowError, StrictDataclassError)


@contextmanager
def config_errors(config_file: Path, what: str):
    """Any error raised while parsing the config / building the skeleton: one line naming config.json."""
    try:
        yield
    except ModelLoadError:
        raise
    except _config_error_types() as err:
        raise ModelLoadError(f"{config_file}: not a valid {what} config ({err.__class__.__name__}: {err})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_numbers(config: dict, config_file: Path, *, positive_ints=(), non_negative_ints=(), positive_floats=(),
                  optional=(), prefix: str = "") -> None:
    """Fields the family reads must be numbers of the right kind (absent: the family's default applies).
    prefix: where a nested config sits ("text_config."), for the message."""
    for name in (*positive_ints, *non_negative_ints, *positive_floats):
        if name not in config or (config[name] is None and name in optional):
            continue
        value = config[name]
        if name in positive_floats:
            ok = (_is_int(value) or isinstance(value, float)) and value > 0 and value == value
            kind = "a positive number"
        else:
            ok = _is_int(value) and value >= (1 if name in positive_ints else 0)
            kind = "a positive integer" if name in positive_ints else "an integer >= 0"
        if not ok:
            raise ModelLoadError(f"{config_file}: {prefix}{name} must be {kind}, got {value!r}")


def tensor_names(path: Path) -> list[str]:
    """Every tensor name in the directory's safetensors files (headers only)."""
    from safetensors import SafetensorError, safe_open

    names: list[str] = []
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                names.extend(f.keys())
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{file}: unreadable safetensors ({err.__class__.__name__}: {err})") from None
    return names


def check_counts(names: list[str], config_file: Path, counts: dict[str, tuple[object, str]]) -> None:
    """counts: field -> (its value, a regex whose group 1 is the index in a tensor name). The value may not exceed
    1 + the largest index the weights hold, so a config cannot make diffrl build more than the files contain."""
    for field, (value, pattern) in counts.items():
        if not _is_int(value) or value < 0:
            raise ModelLoadError(f"{config_file}: {field} must be an integer >= 0, got {value!r}")
        regex = re.compile(pattern)
        found = max((int(m[1]) + 1 for m in map(regex.match, names) if m), default=0)
        if value > found:
            raise ModelLoadError(f"{config_file}: {field} is {value}, but the weights hold {found} "
                                 f"(no tensor matches {pattern} beyond index {found - 1})")

