"""YAML config files with `base:` inheritance and command-line `key=value` overrides.

A config file may name `base: other.yaml` (relative to the including file); the base is loaded
first and the including file is merged over it (mappings merge key by key, everything else is
replaced). Overrides then apply in order, e.g. `train.lr=3e-4 mesh.fsdp=4 data.train[0].limit=100`;
their values stay strings until `from_dict` converts them by the field's type. Relative data and
model paths inside a config are NOT rebased: they are relative to the working directory.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from psynth_jax.config.schema import ExperimentConfig
from psynth_jax.config.typed import ConfigError, UniqueKeyLoader, from_dict, to_dict
from psynth_jax.formats.text_files import InputFileError, describe, read_text

_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*")
_KEY_TOKEN = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load a YAML config (following `base:`), apply `key=value` overrides, and type-check it.

    Raises ValueError naming the dotted field for unknown keys, wrong types and missing required
    values. Semantic checks that touch the file system or devices live in `validate`.
    """
    raw = _load_yaml_tree(Path(path))
    for override in overrides:
        apply_override(raw, override)
    return from_dict(ExperimentConfig, raw)


def dump_config(cfg: ExperimentConfig) -> str:
    """The fully resolved config as YAML (no `base:`), loadable again by `load_config`."""
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
    return "# psynth_jax experiment config (resolved: base files and overrides applied)\n" + body


def _load_yaml_tree(path: Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of `path` merged over its `base:` chain."""
    if path.resolve() in [p.resolve() for p in _including]:
        chain = " -> ".join(str(p) for p in (*_including, path))
        raise ValueError(f"config base cycle: {chain}")
    if not path.is_file():
        where = f" (base of {_including[-1]})" if _including else ""
        raise FileNotFoundError(f"config file not found: {path}{where}")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"{path}: 'base' must be a path to another YAML file, got {base!r}")
    parent = _load_yaml_tree(path.parent / Path(base).expanduser(), (*_including, path))
    return _deep_merge(parent, data)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file); a syntax error, a non-UTF-8 byte or
    another top-level value is a ConfigError naming the file and line."""
    try:
        data = yaml.load(read_text(path), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as err:
        raise ConfigError([_syntax_error(path, err)]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: YAML error: {err}"]) from None
    except InputFileError as err:
        raise ConfigError([str(err)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a config file must hold a mapping (key: value lines) at the top level, "
                           f"found {describe(data)}"])
    return data


def _syntax_error(path: Path, err: yaml.MarkedYAMLError) -> str:
    """`path:line:column: YAML syntax error: ...`. An unclosed { or [ is reported where it opens
    (PyYAML's problem mark is the first token after it, usually on a later line)."""
    unclosed = err.context is not None and err.context.startswith("while parsing a flow") and err.context_mark
    mark = err.context_mark if unclosed else (err.problem_mark or err.context_mark)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    if unclosed:
        bracket = "{" if "mapping" in err.context else "["
        return f"{where}: YAML syntax error: this {bracket} is not closed ({err.problem})"
    what = ": ".join(x for x in (err.context, err.problem) if x)
    return f"{where}: YAML syntax error: {what}"


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set one dotted `key=value` (list items as `key[i]`) in the raw config mapping, in place."""
    key, sep, value = override.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise ValueError(f"malformed override {override!r}: expected dotted.key=value, e.g. train.lr=3e-4")
    tokens: list[str | int] = [name or int(index) for name, index in _KEY_TOKEN.findall(key)]
    node: Any = raw
    walked = ""
    for token, following in zip(tokens, tokens[1:]):
        node = _child(node, token, walked, override, create=[] if isinstance(following, int) else {})
        walked = _step(walked, token)
    last = tokens[-1]
    if isinstance(last, int):
        _child(node, last, walked, override, create=None)  # index must exist
    else:
        _check_section(node, walked, override)
    node[last] = value


def _child(node: Any, token: str | int, walked: str, override: str, create: Any) -> Any:
    if isinstance(token, int):
        if not isinstance(node, list) or token >= len(node):
            size = f"has {len(node)} entries" if isinstance(node, list) else "is not a list"
            raise ValueError(f"override {override!r}: '{walked}' {size}, no [{token}]")
        return node[token]
    _check_section(node, walked, override)
    if node.get(token) is None:
        node[token] = create
    elif not isinstance(node[token], (dict, list)):
        raise ValueError(f"override {override!r}: '{_step(walked, token)}' is a value, not a section")
    return node[token]


def _check_section(node: Any, walked: str, override: str) -> None:
    if isinstance(node, list):
        raise ValueError(f"override {override!r}: '{walked}' is a list; address an item as {walked}[i]")
    if not isinstance(node, dict):
        raise ValueError(f"override {override!r}: '{walked}' is a value, not a section")


def _step(walked: str, token: str | int) -> str:
    return f"{walked}[{token}]" if isinstance(token, int) else (f"{walked}.{token}" if walked else token)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
