"""Reward specs from a recipe: resolved, checked and called once on a sample row before any rollout.

    specs = [{"fn": "math", "weight": 1.0, "kwargs": {"timeout_s": 5}},
             {"fn": "examples/rewards/length_bonus.py:score", "weight": 0.1}]
    rewards = validate_reward_specs(specs, {"prompt": "...", "reference": "42"}, base_dir="recipes/")

Anything wrong raises RewardConfigError with ONE line naming the field, e.g.
`reward[1].fn: module 'my_pkg' has no function 'scor' (did you mean 'score'?)`.
A bare string or a single mapping is accepted as a one-element list (the recipe shorthand).

Item fields beyond prompt, response and reference reach a function that names them as parameters: the data row's
other columns (e.g. `metadata`), `row` (the whole data row as one dict) and `response_len` (tokens). Built-in
rewards get `response_len` only. A parameter without a default that no column provides fails validation here.
"""
from __future__ import annotations

import asyncio
import difflib
import inspect
import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards.registry import BUILTINS, explicit_params, is_async, kind_of, load_fn
from rewards.result import RewardConfigError, as_float, reason_category
from rollout.errors import one_line

__all__ = [
    "ITEM_FIELDS",
    "RewardSpec",
    "parse_specs",
    "resolve_reward_specs",
    "run_sync",
    "to_result",
    "validate_reward_specs",
]

ITEM_FIELDS = ("prompt", "response", "reference")
# What the driver adds to every item besides the data row's own columns: the response's token count, and the whole
# data row (every column under its name, prompt and answer included) for rewards that want it as one dict.
DRIVER_FIELDS = ("response_len", "row")
# Built-in rewards take their options from the recipe only: a data column named like one of their options
# (`extract`, `timeout_s`, ...) must not change how they score.
BUILTIN_ITEM_FIELDS = frozenset({"response_len"})
_SPEC_KEYS = ("fn", "weight", "kwargs", "name")


@dataclass(frozen=True)
class RewardSpec:
    """A resolved reward: what the Scorer calls."""
    field: str  # "reward[0]": the recipe field errors name
    fn_name: str  # as written in the recipe
    name: str  # the metric prefix: "math", "length_bonus", ...
    fn: Callable
    weight: float
    kwargs: dict[str, Any]
    kind: str  # "single" | "batch"
    is_async: bool
    extra_fields: frozenset[str] = field(default_factory=frozenset)  # item fields the function names explicitly
    required_fields: frozenset[str] = field(default_factory=frozenset)  # those of them without a default

    def to_dict(self) -> dict[str, Any]:
        """The plain spec again, for an actor in another process to resolve for itself. A name registered with
        register_reward() at run time is replaced by the function's import path, since the actor's registry
        only has what its own imports registered."""
        return {"fn": self._portable_fn(), "weight": self.weight, "kwargs": dict(self.kwargs), "name": self.name}

    def _portable_fn(self) -> str:
        if ":" in self.fn_name or self.fn_name in BUILTINS:
            return self.fn_name
        module, qualname = getattr(self.fn, "__module__", None), getattr(self.fn, "__qualname__", "")
        if module and module != "__main__" and getattr(sys.modules.get(module), qualname, None) is self.fn:
            return f"{module}:{qualname}"
        return self.fn_name  # defined in a script or a function body: the actor must register it itself


def parse_specs(specs: Any) -> list[dict[str, Any]]:
    if isinstance(specs, (str, dict)):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not specs:
        raise RewardConfigError(f"reward: expected a list of reward specs, got {one_line(repr(specs), 80)}")
    out = []
    for i, spec in enumerate(specs):
        spec = {"fn": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            raise RewardConfigError(f"reward[{i}]: expected a mapping with 'fn', got {type(spec).__name__}")
        unknown = [k for k in spec if k not in _SPEC_KEYS]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), _SPEC_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(_SPEC_KEYS)}"
            raise RewardConfigError(f"reward[{i}]: unknown key {unknown[0]!r}{hint}")
        if "fn" not in spec:
            raise RewardConfigError(f"reward[{i}].fn: missing (a registered name, 'module:function' or 'file.py:function')")
        weight = as_float(spec.get("weight", 1.0))
        if weight is None:
            raise RewardConfigError(f"reward[{i}].weight: expected a finite number, got {spec['weight']!r}")
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise RewardConfigError(f"reward[{i}].kwargs: expected a mapping of names to values, got {kwargs!r}")
        out.append({"fn": spec["fn"], "weight": weight, "kwargs": dict(kwargs), "name": spec.get("name")})
    return out


def _default_name(fn_text: str) -> str:
    if ":" not in fn_text:
        return fn_text
    where, _, func = fn_text.rpartition(":")
    if func not in ("score", "score_batch", "reward", "compute_score"):
        return func
    return re.split(r"[./\\]", where.removesuffix(".py"))[-1] or func


def _short_signature(fn: Callable, sig: inspect.Signature) -> str:
    parts = []
    for p in sig.parameters.values():
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        parts.append(prefix + p.name + ("=" + one_line(repr(p.default), 20) if p.default is not p.empty else ""))
    return f"{getattr(fn, '__name__', 'function')}({', '.join(parts)})"


def _check_signature(field_: str, spec: dict, fn: Callable, kind: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a C function without introspection: the sample call below still checks it
    positional = ("prompts", "responses", "references") if kind == "batch" else ITEM_FIELDS
    try:  # partial: a parameter beyond these is filled from the item's fields (a data column) or a recipe kwarg
        sig.bind_partial(*positional)
    except TypeError:
        raise RewardConfigError(f"{field_}.fn: {_short_signature(fn, sig)} cannot be called as "
                                f"({', '.join(positional)}, **kwargs); see rewards/registry.py") from None
    params = sig.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][len(positional):]
    for key in spec["kwargs"]:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RewardConfigError(f"{field_}.kwargs: {spec['fn']!r} has no parameter {key!r}{hint}; "
                                    f"it accepts: {', '.join(accepted) or 'none'}")


def resolve_reward_specs(specs: Any, base_dir: str | Path | None = None) -> list[RewardSpec]:
    """Resolve every spec and check its signature; calls nothing."""
    resolved, names = [], set()
    for i, spec in enumerate(parse_specs(specs)):
        field_ = f"reward[{i}]"
        try:
            fn = load_fn(spec["fn"], base_dir)
        except LookupError as exc:
            raise RewardConfigError(f"{field_}.fn: {exc}") from None
        kind = kind_of(fn)
        _check_signature(field_, spec, fn, kind)
        name = spec["name"] or _default_name(spec["fn"])
        while name in names:
            name += f"_{i}"
        names.add(name)
        extra = explicit_params(fn) - set(ITEM_FIELDS) - {"prompts", "responses", "references"} - set(spec["kwargs"])
        if spec["fn"] in BUILTINS or spec["fn"] in BUILTINS.values():
            extra &= BUILTIN_ITEM_FIELDS
        required = extra & _without_default(fn)
        resolved.append(RewardSpec(field_, spec["fn"], name, fn, spec["weight"], spec["kwargs"], kind, is_async(fn),
                                   frozenset(extra), frozenset(required)))
    return resolved


def _without_default(fn: Callable) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def to_result(value: Any) -> dict[str, Any]:
    """A reward function's return value as {score, reason, metrics}; ValueError saying what is wrong otherwise."""
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"returned a dict without 'score' (keys: {', '.join(map(str, value)) or 'none'})")
        score = as_float(value["score"])
        if score is None:
            raise ValueError(f"returned score {one_line(repr(value['score']), 60)} is not a finite number")
        reason = value.get("reason", "ok")
        if not isinstance(reason, str):
            raise ValueError(f"returned reason {one_line(repr(reason), 60)} is not a string")
        metrics = {}
        extra = {k: v for k, v in value.items() if k not in ("score", "reason", "metrics")}
        for key, metric in {**(value.get("metrics") or {}), **extra}.items():
            number = as_float(metric)
            if number is None:
                raise ValueError(f"returned metric {key!r} = {one_line(repr(metric), 60)} is not a number")
            metrics[str(key)] = number
        return {"score": score, "reason": reason, "metrics": metrics}
    score = as_float(value)
    if score is None:
        raise ValueError(f"returned {one_line(repr(value), 60)} ({type(value).__name__}); expected a number or a "
                         f"dict with a numeric 'score'")
    return {"score": score, "reason": "ok", "metrics": {}}


def _call_once(spec: RewardSpec, row: dict[str, Any]) -> Any:
    extras = {k: row[k] for k in spec.extra_fields if k in row}
    if spec.kind == "batch":
        args = ([row["prompt"]], [row["response"]], [row["reference"]])
        extras = {k: [v] for k, v in extras.items()}
    else:
        args = (row["prompt"], row["response"], row["reference"])
    out = spec.fn(*args, **spec.kwargs, **extras)
    if inspect.isawaitable(out):
        out = run_sync(out)
    if spec.kind == "batch":
        if not isinstance(out, (list, tuple)) or len(out) != 1:
            raise ValueError(f"a batch reward returned {type(out).__name__} "
                             f"{'of length ' + str(len(out)) if isinstance(out, (list, tuple)) else ''}"
                             f" for 1 item; expected a list with one entry per item")
        out = out[0]
    return out


async def _awaited(awaitable):
    return await awaitable


def run_sync(awaitable) -> Any:
    """Await from synchronous code, also when this thread already runs an event loop (an async Ray actor)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(awaitable))
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _awaited(awaitable)).result()


def validate_reward_specs(specs: Any, sample_row: dict[str, Any], base_dir: str | Path | None = None
                          ) -> list[RewardSpec]:
    """resolve_reward_specs, then call each reward on `sample_row` (response defaults to "") and check the return.

    Built-ins run for real on the sample (math starts its worker pool, code runs one sandbox)."""
    row = {"response": "", "response_len": 0, **sample_row}
    missing = [k for k in ("prompt", "reference") if k not in row]
    if missing:
        raise RewardConfigError(f"reward: the sample row has no {missing[0]!r} field (fields: {', '.join(row)})")
    resolved = resolve_reward_specs(specs, base_dir)
    for spec in resolved:
        label = spec.fn_name if spec.fn_name in BUILTINS else getattr(spec.fn, "__name__", spec.fn_name)
        missing = sorted(spec.required_fields - set(row))
        if missing:
            columns = sorted(set(row.get("row") or {}) or set(row) - {"response"})
            raise RewardConfigError(f"{spec.field}.fn: {label!r} takes {missing[0]!r}, which is not a column of the "
                                    f"data (columns: {', '.join(columns) or 'none'}) nor a recipe kwarg")
        try:
            out = _call_once(spec, row)
        except Exception as exc:  # any failure of the user's function on a valid row is a config error: one line
            raise RewardConfigError(f"{spec.field}.fn: {label!r} raised {type(exc).__name__}: {exc} "
                                    f"on the sample row") from None
        try:
            result = to_result(out)
        except ValueError as exc:
            raise RewardConfigError(f"{spec.field}.fn: {label!r} {exc} on the sample row") from None
        if reason_category(result["reason"]) == "error":  # e.g. a built-in that cannot read this data's references
            raise RewardConfigError(f"{spec.field}.fn: {label!r} cannot score the sample row: {result['reason']}")
    return resolved
