"""Reading recipes: YAML files, `extends` chains, dotted CLI overrides, and one-line error messages.

Kept apart from the schema (launch/recipe.py) so that each file reads top to bottom: this module knows nothing
about RL, only about nested mappings and how to name a position in them. Like recipe.py it imports no Ray, torch
or transformers: recipes are checked before anything heavy starts.
"""
from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ValidationError

from rollout.errors import OneLineError

# Sections that are discriminated unions on `name`: a different name means a different parameter set, so they are
# replaced, not merged, when a child recipe (or an override) switches the name.
TAGGED_SECTIONS = ("algorithm", "estimator")


class RecipeError(OneLineError):
    """A recipe that cannot run. The message is a single line naming the file and the key path."""


# ---------------------------------------------------------------------------------------------------- YAML files
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-6` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (`1e-6` is a string): learning rates are written that way
    in every RL paper, and silently keeping a string in a reward's kwargs would be a bug found much later.
    """


_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789"))


def _construct_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (line {line})")
        seen.add(key)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects; errors become one line naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{source}: invalid YAML{where}: {problem}") from None


def read_recipe_file(path: Path) -> dict:
    """One recipe file as a mapping (an empty file is an empty recipe)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return normalize_shorthands(data)


def normalize_shorthands(data: dict) -> dict:
    """Expand the short forms: `algorithm: gdpo` is `algorithm: {name: gdpo}` (same for estimator), and a single
    reward, `reward: {fn: math}` or `reward: math`, is a one-element list."""
    out = dict(data)
    for key in TAGGED_SECTIONS:
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    reward = out.get("reward")
    if isinstance(reward, str):
        out["reward"] = [{"fn": reward}]
    elif isinstance(reward, dict):
        out["reward"] = [reward]
    return out


def read_chain(path: str | Path) -> list[tuple[Path, dict]]:
    """The recipe and the files it `extends`, base first, each without its `extends` key.

    `extends` is resolved relative to the file that names it, so a recipe directory can be moved as a whole.
    """
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    current = Path(path)
    while True:
        resolved = current.resolve()
        if resolved in seen:
            cycle = " -> ".join(str(p) for p in [*chain_paths(chain), current])
            raise RecipeError(f"{chain[0][0]}: extends cycle: {cycle}")
        seen.append(resolved)
        data = read_recipe_file(current)
        parent = data.pop("extends", None)
        chain.append((current, data))
        if parent is None:
            break
        if not isinstance(parent, str) or not parent:
            raise RecipeError(f"{current}: extends: expected a file name, got {parent!r}")
        current = current.parent / parent
    return chain[::-1]


def chain_paths(chain: list[tuple[Path, dict]]) -> list[Path]:
    return [p for p, _ in chain]


# ------------------------------------------------------------------------------------------- merging, overrides
def deep_merge(base: Any, child: Any, top: bool = True) -> Any:
    """Mappings merge key by key, anything else (lists, scalars, null) in `child` replaces `base`."""
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return child
    out = dict(base)
    for key, value in child.items():
        old = out.get(key)
        if top and key in TAGGED_SECTIONS and _renamed(old, value):
            out[key] = value
        else:
            out[key] = deep_merge(old, value, top=False) if key in out else value
    return out


def _renamed(old: Any, new: Any) -> bool:
    return isinstance(old, dict) and isinstance(new, dict) and "name" in new and new["name"] != old.get("name")


def apply_override(data: dict, override: str) -> dict:
    """Apply one `dotted.key=value` override (value parsed as YAML) and return the new mapping.

    Integer parts index lists (`reward.0.weight=2`; index == length appends). Missing mappings along the way are
    created, so an override of an unknown key reaches validation and fails there exactly like a bad recipe key.
    """
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {override!r}: expected dotted.key=value")
    value = parse_yaml(text, f"override {override!r}")
    parts = key.split(".")
    if parts[0] in TAGGED_SECTIONS and isinstance(value, str) and len(parts) == 1:
        value = {"name": value}
    if len(parts) == 2 and parts[0] in TAGGED_SECTIONS and parts[1] == "name":
        old = data.get(parts[0])
        if isinstance(old, dict) and old.get("name") not in (None, value):
            # Switching algorithm/estimator drops the old one's parameters (they would be unknown keys).
            return {**data, parts[0]: {"name": value}}
    return _set_path(data, parts, value, override)


def _set_path(node: Any, parts: list[str], value: Any, override: str) -> Any:
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(node, list) and head.lstrip("-").isdigit():
        index = int(head)
        if not 0 <= index <= len(node):
            raise RecipeError(f"override {override!r}: index {index} out of range (list has {len(node)} items)")
        out = list(node)
        child = out[index] if index < len(out) else None
        new = _set_path(child, rest, value, override)
        out[index:index + 1] = [new]
        return out
    out = dict(node) if isinstance(node, dict) else {}
    out[head] = _set_path(out.get(head), rest, value, override)
    return out


# ----------------------------------------------------------------------------------------- paths, model source
# The one rule for relative paths: an input path written in a recipe file (model, data, value model, reward file) is
# relative to that file's folder (each file of an `extends` chain to its own folder); a path given on the command
# line is relative to the working directory. load_recipe makes them absolute as it reads each layer, so the
# validated recipe means the same thing from anywhere. output_dir is where the run goes, not an input: like its
# default runs/NAME it is relative to the working directory (the driver makes it absolute there).
PATH_FIELDS = (("model", "path"), ("data", "train"), ("data", "eval"), ("data", "preferences"),
               ("algorithm", "value_model", "path"))


def absolute_paths(data: dict, base: Path) -> dict:
    """`data` (one recipe layer) with its relative local paths joined to `base`: the PATH_FIELDS and the file of
    each `file.py:func` reward. Anything that is not a non-empty string is left for validation to judge."""
    out = dict(data)
    for field in PATH_FIELDS:
        out = _rebase(out, field, base)
    reward = out.get("reward")
    if isinstance(reward, list):
        specs = []
        for spec in reward:
            fn = spec.get("fn") if isinstance(spec, dict) else None
            where, sep, func = fn.rpartition(":") if isinstance(fn, str) else ("", "", "")
            if sep and where.endswith(".py") and not Path(where).expanduser().is_absolute():
                spec = {**spec, "fn": f"{(base / where).resolve()}:{func}"}
            specs.append(spec)
        out["reward"] = specs
    return out


def _rebase(node: Any, field: tuple[str, ...], base: Path) -> Any:
    if not isinstance(node, dict) or field[0] not in node:
        return node
    value = node[field[0]]
    if len(field) > 1:
        return {**node, field[0]: _rebase(value, field[1:], base)}
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return {**node, field[0]: str((base / value).resolve())}
    return node


def switch_model_source(merged: dict, layer: dict) -> dict:
    """A layer that sets model.path (or model.tiny) replaces the model source it inherits: the other one and the
    tiny-only model.tiny_vocab are dropped, so `model.path=/ckpt` on a tiny recipe needs nothing else nulled."""
    model, old = layer.get("model"), merged.get("model")
    if not (isinstance(model, dict) and isinstance(old, dict)):
        return merged
    if model.get("path") is not None and "tiny" not in model:
        old = {k: v for k, v in old.items() if k not in ("tiny", "tiny_vocab")}
    elif model.get("tiny") is not None and "path" not in model:
        old = {k: v for k, v in old.items() if k != "path"}
    return {**merged, "model": old}


# ------------------------------------------------------------------------------------ renamed, merged settings
# Settings a recipe may no longer use, with the one-line hint to what replaced them: (section, key) -> hint, and
# (section, key, value) -> hint for a value that was renamed.
RETIRED_KEYS: dict[tuple[str, str], str] = {
    ("resources", "rollout_workers"): "merged into rollout.num_workers (one setting; remove this key)",
    ("resources", "learner_workers"): "merged into learner.num_workers (one setting; remove this key)",
    ("learner", "activation_checkpointing"): "merged into model.gradient_checkpointing (one setting, any backend)",
}
RETIRED_VALUES: dict[tuple[str, str, Any], str] = {
    ("rollout", "cache", "kv"): "'kv' is now called 'block' (the exact KV cache of block-causal models)",
    ("learner", "zero_stage", 0): "0 no longer means 'unset': leave the key out (backend deepspeed defaults to 2)",
    ("rollout", "engine", "sglang"): ("there is no SGLang engine: its diffusion path returns no log-probs and no "
                                      "step map (README, 'SGLang'); use torch"),
}


def retired_setting(data: dict) -> str | None:
    """`section.key: hint` for the first renamed or merged setting the mapping still uses, else None."""
    for (section, key), hint in RETIRED_KEYS.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            return f"{section}.{key}: {hint}"
    for (section, key, value), hint in RETIRED_VALUES.items():
        held = data.get(section).get(key, _ABSENT) if isinstance(data.get(section), dict) else _ABSENT
        if held is not _ABSENT and type(held) is type(value) and held == value:
            return f"{section}.{key}: {hint}"
    return None


_ABSENT = object()


# ------------------------------------------------------------------------------------- one-line error messages
def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> tuple[str, tuple[str, ...]]:
    """The first pydantic error as `key.path: what is wrong` (+ "(and N more)"), and that key path as a tuple."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path, message = describe_error(first, root)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return message, path


def describe_error(error: dict, root: type[BaseModel]) -> tuple[tuple[str, ...], str]:
    kind, loc, given = error["type"], tuple(error["loc"]), error.get("input")
    walk = _walk(root, loc)
    path = walk.path
    dotted = ".".join(path)
    msg = error["msg"]
    if kind == "value_error":  # our own checks: the message already starts with its key path when loc is empty
        text = msg.removeprefix("Value error, ")
        if path:
            return path, f"{dotted}: {text}"
        named = re.match(r"^([\w.]+): ", text)
        return (tuple(named.group(1).split(".")) if named else ()), text
    if kind == "extra_forbidden":
        return path, f"{dotted}: unknown key{_key_hint(path[-1], walk)}"
    if kind == "missing":
        return path, f"{dotted}: required key missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = _union_tags(walk.annotation)
        name_path = f"{dotted}.name"
        if kind == "union_tag_not_found":
            return (*path, "name"), f"{name_path}: required key missing (one of {', '.join(tags)})"
        tag = str(error["ctx"]["tag"])
        return (*path, "name"), f"{name_path}: {tag!r} is not one of {', '.join(tags)}{_suggest(tag, tags)}"
    if kind == "literal_error":
        options = [str(o) for o in _literal_options(walk.annotation)]
        return path, f"{dotted}: {given!r} is not one of {', '.join(options)}{_suggest(str(given), options)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"{dotted or 'recipe'}: expected a mapping, got {_short(given)}"
    bound = _BOUNDS.get(kind)
    if bound is not None:
        op, key = bound
        return path, f"{dotted}: must be {op} {error['ctx'][key]}, got {_short(given)}"
    lowered = msg[:1].lower() + msg[1:]
    return path, f"{dotted}: {lowered} (got {_short(given)})"


_BOUNDS = {
    "greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"), "less_than_equal": ("<=", "le"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _key_hint(key: str, walk: _Walk) -> str:
    hint = _suggest(key, walk.holder.model_fields if walk.holder is not None else ())
    if hint or not walk.siblings:
        return hint
    # A valid key of another algorithm/estimator: say which, rather than nothing.
    users = [tag for tag, model in walk.siblings.items() if key in model.model_fields]
    return f" for {walk.tag} (used by {', '.join(users)})" if users else ""


class _Walk(typing.NamedTuple):
    path: tuple[str, ...]  # the loc without union tags: what the user wrote
    holder: type[BaseModel] | None  # the model whose keys the last part was looked up in
    annotation: Any  # the type at the end of the loc
    siblings: dict[str, type[BaseModel]]  # members of the last tagged union passed through, by tag
    tag: str


def _walk(root: type[BaseModel], loc: tuple) -> _Walk:
    """Follow a pydantic loc through the schema: drop union tags, remember the model holding the last key."""
    path: list[str] = []
    annotation: Any = root
    holder: type[BaseModel] | None = None
    siblings: dict[str, type[BaseModel]] = {}
    tag = ""
    for item in loc:
        annotation = _strip_optional(annotation)
        members = _tagged_members(annotation)
        if members and str(item) in members:
            siblings, tag = members, str(item)
            annotation = members[tag]
            continue
        path.append(str(item))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            holder = annotation
            field = annotation.model_fields.get(str(item))
            annotation = field.annotation if field is not None else None
        elif typing.get_origin(annotation) in (list, tuple):
            args = typing.get_args(annotation)
            annotation = args[0] if args else None
        else:
            annotation = None
    return _Walk(tuple(path), holder, _strip_optional(annotation), siblings, tag)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _strip_optional(annotation: Any) -> Any:
    if _is_union(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    if not _is_union(annotation):
        return {}
    members = {}
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "name" in arg.model_fields:
            members[str(arg.model_fields["name"].default)] = arg
    return members


def _union_tags(annotation: Any) -> list[str]:
    return list(_tagged_members(annotation))


def _literal_options(annotation: Any) -> list:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return []


def origin_of(path: tuple[str, ...], chain: list[tuple[Path, dict]]) -> Path:
    """The file of the chain that sets `path` (child first), else the recipe itself: the file to go and fix."""
    for file, data in reversed(chain):
        if _has_path(data, path):
            return file
    return chain[-1][0]


def _has_path(data: Any, path: tuple[str, ...]) -> bool:
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return bool(path)
