"""Plain data (parsed YAML, override strings) <-> typed frozen dataclasses.

`from_dict` walks a dataclass's fields, converts each value by the field's type annotation and
collects every problem (unknown key, wrong type, missing required value) with the full dotted
field name, so one run of a bad config reports all of it. Strings are accepted wherever a
command-line override may supply one: "3e-4" for a float, "true" for a bool, "null" for an
Optional, "q,k,v" or "[256, 512]" for a sequence, a YAML flow mapping for a nested section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

T = TypeVar("T")

_NULL_WORDS = frozenset({"null", "none", "~"})
_TRUE_WORDS = frozenset({"true", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "no", "off"})


class ConfigError(ValueError):
    """One or more config problems, each naming its dotted field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(errors) == 1:
            message = errors[0]
        else:
            message = f"invalid config ({len(errors)} problems):\n  - " + "\n  - ".join(errors)
        super().__init__(message)


class _Invalid:
    """Marker for a value that failed conversion (its error is already recorded)."""


_INVALID = _Invalid()


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from plain data; raise ConfigError listing every problem."""
    errors: list[str] = []
    result = _build(cls, data, path, errors)
    if errors:
        raise ConfigError(errors)
    return result


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config, in field order; the inverse of from_dict."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _join(prefix: str, key: str) -> str:
    """Dotted field name of `key` under `prefix`."""
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    if isinstance(data, str):  # a whole section given as one override, e.g. lora={rank: 8}
        data = _parse_yaml(data)
    if data is None:  # an empty YAML section (`lora:` with every key commented out)
        data = {}
    if not isinstance(data, Mapping):
        errors.append(f"config key '{path}' must be a mapping of {cls.__name__} fields, got {data!r}")
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(_unknown_key_message(str(key), path, list(fields)))
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        field_path = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], field_path, errors)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, field_path, errors)  # defaults, or missing leaves
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            errors.append(f"missing required config value '{field_path}'")
            kwargs[name] = _INVALID
    if any(value is _INVALID for value in kwargs.values()):
        return _INVALID
    return cls(**kwargs)


def _unknown_key_message(key: str, path: str, known: list[str]) -> str:
    message = f"unknown config key '{_join(path, key)}'"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{message} (did you mean '{_join(path, close[0])}'?)"
    return f"{message} (valid keys{' under ' + repr(path) if path else ''}: {', '.join(known)})"


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Convert `value` to type `tp`, or record an error naming `path` and return _INVALID."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1 or len(args) != 2:
            raise TypeError(f"config field '{path}': only Optional[X] unions are supported, got {tp}")
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None
        return _coerce(value, options[0], path, errors)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        errors.append(f"config key '{path}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return _INVALID
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, args, path, errors)
    converted = _coerce_scalar(value, tp, path)
    if converted is _INVALID:
        wanted = "a finite number" if tp is float else tp.__name__
        errors.append(f"config key '{path}' expects {wanted}, got {value!r}")
    return converted


def _coerce_sequence(value: Any, origin: type, args: tuple, path: str, errors: list[str]) -> Any:
    items = _parse_sequence(value) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        errors.append(f"config key '{path}' expects a list, got {value!r}")
        return _INVALID
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):
            errors.append(f"config key '{path}' expects {len(args)} items, got {len(items)}")
            return _INVALID
        item_types = list(args)
    else:
        item_types = [args[0]] * len(items)
    out = [_coerce(v, t, f"{path}[{i}]", errors) for i, (v, t) in enumerate(zip(items, item_types))]
    return _INVALID if any(v is _INVALID for v in out) else origin(out)


def _coerce_scalar(value: Any, tp: type, path: str) -> Any:
    """bool/int/float/str conversion; bools are never numbers and numbers never strings."""
    text = value.strip() if isinstance(value, str) else None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return text.lower() in _TRUE_WORDS
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
    elif tp is float:  # finite only: nan / inf pass every range check (nan compares False) in silence
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:
            try:
                number = float(text)  # also YAML 1.1's "1e-4", which PyYAML reads as a string
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field '{path}' has unsupported type {tp!r}")
    return _INVALID


def _parse_sequence(text: str) -> Any:
    """'[1, 2]' as YAML, 'a,b' as comma-separated strings, '' as empty."""
    text = text.strip()
    if text.startswith("["):
        return _parse_yaml(text)
    return [part.strip() for part in text.split(",")] if text else []


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        return text  # left as a string, so the type check reports it with its field name


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that holds the same key twice (PyYAML keeps the
    last one in silence, so a config's second `train:` section would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen and key != "<<":
                first = seen[key].start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)
