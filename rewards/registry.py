"""Reward functions by name, and how a recipe's `fn` string becomes a callable.

A reward function is one of:

    def score(prompt: str, response: str, reference: Any, **kwargs) -> float | dict          # one item
    def score_batch(prompts, responses, references, **kwargs) -> list[float | dict]           # a whole batch
    async def score(...) / async def score_batch(...)                                         # awaited, gathered

A dict return has a numeric `score`, optionally a `reason` (str) and a `metrics` dict; any other key must be numeric
and becomes a logged metric. The kind (one item or batch) comes from the `@reward(batch=True)` decorator when
present, else from the name (`score_batch`) or the first parameter (`prompts`). Item fields beyond prompt, response
and reference are passed only to functions that name them as parameters (a batch function gets a list): every
other column of the data row under its own name (e.g. `metadata`), `row` (the whole data row as a dict, prompt and
answer columns included) and `response_len` (the response's token count). A recipe kwarg of the same name wins;
built-in rewards get `response_len` only.

`fn` in a recipe: a registered name (`math`, `code`, `format`, `length_penalty`, the toy tasks' `arithmetic`,
`countdown`, `sudoku`, or one added with `register_reward`), `package.module:function`, or `path/to/file.py:function`
(relative to the recipe's folder).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTINS",
    "explicit_params",
    "is_async",
    "kind_of",
    "load_fn",
    "register_reward",
    "registered_names",
    "reward",
]

# Built-ins are import paths, resolved on first use: importing this module must not import sympy. The toy tasks'
# verifiers live with their generators in rl.tasks (numpy only), imported only when a recipe names one.
BUILTINS = {
    "math": "rewards.math_reward:score_batch",
    "code": "rewards.code_reward:score_batch",
    "format": "rewards.shaping:format_reward",
    "length_penalty": "rewards.shaping:length_penalty_reward",
    "arithmetic": "rl.tasks:arithmetic_reward",
    "countdown": "rl.tasks:countdown_reward",
    "sudoku": "rl.tasks:sudoku_reward",
}
_REGISTRY: dict[str, Callable] = {}
_FILE_MODULES: dict[str, Any] = {}
_LOCK = threading.Lock()
_KIND_ATTR = "__diffrl_reward_kind__"


def reward(fn: Callable | None = None, *, batch: bool = False):
    """Mark a function as a reward (`@reward` or `@reward(batch=True)`): makes its kind explicit."""
    def mark(f: Callable) -> Callable:
        setattr(f, _KIND_ATTR, "batch" if batch else "single")
        return f

    return mark(fn) if fn is not None else mark


def register_reward(name: str, fn: Callable | None = None, *, batch: bool | None = None):
    """Make `fn` available to recipes as `fn: <name>` (decorator or call). Re-registering a name replaces it."""
    def add(f: Callable) -> Callable:
        if batch is not None:
            reward(f, batch=batch)
        with _LOCK:
            _REGISTRY[name] = f
        return f

    return add(fn) if fn is not None else add


def registered_names() -> list[str]:
    return sorted(set(BUILTINS) | set(_REGISTRY))


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _import_module(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LookupError(f"cannot import module {module!r} ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # the user's module raised while importing: report it on one line, with its type
        raise LookupError(f"importing module {module!r} failed: {type(exc).__name__}: {exc}") from exc


def _load_file(path_text: str, base_dir: Path) -> Any:
    path = (base_dir / Path(path_text).expanduser()).resolve()
    if not path.is_file():
        raise LookupError(f"file {path_text!r} not found (resolved to {path})")
    key = str(path)
    with _LOCK:
        if key in _FILE_MODULES:
            return _FILE_MODULES[key]
        name = f"diffrl_reward_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickle look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a syntax error or a failing import in the user's file: one line, with its type
            del sys.modules[name]
            raise LookupError(f"importing {path_text!r} failed: {type(exc).__name__}: {exc}") from exc
        _FILE_MODULES[key] = module
        return module


def load_fn(fn: str, base_dir: str | Path | None = None) -> Callable:
    """The callable a recipe names. Raises LookupError with a one-line reason (no field name: the caller adds it)."""
    if not isinstance(fn, str) or not fn.strip():
        raise LookupError(f"expected a registered name, 'module.path:function' or 'file.py:function', got {fn!r}")
    if ":" not in fn:
        if fn in _REGISTRY:
            return _REGISTRY[fn]
        if fn in BUILTINS:
            return load_fn(BUILTINS[fn])
        raise LookupError(f"unknown reward {fn!r}{_suggest(fn, registered_names())}; registered: "
                          f"{', '.join(registered_names())}; or use 'module.path:function' or 'file.py:function'")
    where, _, name = fn.rpartition(":")
    is_file = where.endswith(".py") or "/" in where or where.startswith(".")
    module = _load_file(where, Path(base_dir or Path.cwd())) if is_file else _import_module(where)
    label = f"file {where!r}" if is_file else f"module {where!r}"
    if not hasattr(module, name):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise LookupError(f"{label} has no function {name!r}{_suggest(name, public)}")
    found = getattr(module, name)
    if not callable(found):
        raise LookupError(f"{label}: {name!r} is a {type(found).__name__}, not a function")
    return found


def is_async(fn: Callable) -> bool:
    # an instance with `async def __call__` counts too
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))


def kind_of(fn: Callable) -> str:
    """'batch' or 'single' (see the module docstring for the rules)."""
    marked = getattr(fn, _KIND_ATTR, None)
    if marked:
        return marked
    if getattr(fn, "__name__", "") == "score_batch":
        return "batch"
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature: assume the documented single-item form
        return "single"
    return "batch" if params and params[0] == "prompts" else "single"


def explicit_params(fn: Callable) -> set[str]:
    """Keyword-capable parameter names the function declares itself (so extra item fields can go to it)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
