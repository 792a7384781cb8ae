"""Small-dataclass configs: strict building from dicts and `--set a.b=c` overrides.

Every component owns a dataclass; a job is a tree of them. Building from a dict rejects unknown
keys with the full dotted path of the offender, so a typo in a sweep never silently runs defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_choice(value: Any, choices: Any, where: str) -> None:
    """`value` is one of `choices` (a `Literal[...]` type or a tuple); else a ConfigError naming `where`."""
    options = typing.get_args(choices) if typing.get_origin(choices) is typing.Literal else tuple(choices)
    # `in` alone would take True for 1 and 1.0 for 1: the type must match too.
    if not any(value == o and type(value) is type(o) for o in options):
        shown = ", ".join(repr(o) if o == "" else str(o) for o in options)
        raise ConfigError(f"{where} must be one of {shown}, got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:  # a field's choices: the loader checks them
        check_choice(value, tp, where)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        et = args[0] if args else Any
        out = [_coerce(v, et, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--set run_name=2024` parses as an int
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]} (known keys of {cls.__name__}: {', '.join(sorted(types_))})"
        )
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_value(text: str) -> Any:
    """`3` -> 3, `0.1` -> 0.1, `true` -> True, `[1,2]` -> [1, 2], anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply `a.b.c=value` strings to a dataclass tree; returns a new, re-validated tree.

    `tasks.*.key=value` sets the key in every task entry (e.g. `--set tasks.*.batch_size=2`).
    """
    values = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        values.append((key.strip(), parse_value(raw), f"override {item!r}"))
    return _apply(cfg, values)


def apply_values(cfg: T, values: dict[str, Any], where: str = "override") -> T:
    """`apply_overrides` with typed values: {"optim.lr": 0.1, "tasks.rot": {"type": ...}} (an
    override file, a sweep's sampled parameters). `where` names the source in errors."""
    return _apply(cfg, [(k, v, f"{where} {k}={v!r}") for k, v in values.items()])


def _apply(cfg: T, values: list[tuple[str, Any, str]]) -> T:
    data = to_dict(cfg)
    for key, value, item in values:
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "tasks" and parts[1] == "*":
            targets = [["tasks", name, *parts[2:]] for name in data.get("tasks", {})]
        else:
            targets = [parts]
        for path in targets:
            _set(data, path, value, item)
    return rebuild(type(cfg), data)


def _set(data: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    # Task entries are free-form here (the plugin's config class validates them when the task is
    # built), so `--set tasks.in21k.crop_scale_min=0.08` may add a key the job left at its default,
    # and `tasks.<name>={"type": ..., ...}` adds (or replaces) a whole task.
    if len(parts) == 2 and parts[0] == "tasks" and parts[1] != "*" and isinstance(data.get("tasks"), dict):
        if not (isinstance(value, dict) and "type" in value):
            raise ConfigError(
                f"{item}: a whole task entry must be a mapping with a 'type' key, got {value!r}"
            )
        data["tasks"][parts[1]] = value
        return
    free_form = len(parts) >= 3 and parts[0] == "tasks"
    node = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, dict) and part not in node and free_form and i >= 2:
            node[part] = {}
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])} in {item}")
        node = node[part]
    if not isinstance(node, dict) or (parts[-1] not in node and not free_form):
        raise ConfigError(f"unknown key {'.'.join(parts)} in {item}")
    node[parts[-1]] = value


def rebuild(cls: type[T], data: dict[str, Any]) -> T:
    """from_dict, but dataclasses that define `from_dict` themselves (polymorphic ones) are honoured."""
    hook = getattr(cls, "from_dict", None)
    if hook is not None:
        return hook(data)
    return from_dict(cls, data)
