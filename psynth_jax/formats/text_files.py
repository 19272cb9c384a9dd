"""Reading UTF-8 text, JSON and JSON-lines files with errors that name the file and the line.

Python's own messages point at the wrong place for a user: `json.loads` of one JSON-lines line
says "line 1 column 34" for the file's 4th line, a UnicodeDecodeError gives a byte offset and no
file, a JSONDecodeError names no file at all. Every reader of user files (data rows, configs,
checkpoint config.json) goes through these functions, so a bad file is reported as
`path:line[:column]: what is wrong`, one line, and as a ValueError (the CLI's input-error kind).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


class InputFileError(ValueError):
    """A file that cannot be read as what it should be; the message names it (and the line)."""


def decode_text(data: bytes, path: PathLike) -> str:
    """`data` decoded as UTF-8 (a leading BOM dropped), or InputFileError naming line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputFileError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def read_text(path: PathLike) -> str:
    """The file's text, decoded as UTF-8 (InputFileError naming the line of a bad byte)."""
    return decode_text(Path(path).read_bytes(), path)


def json_error(path: PathLike, err: json.JSONDecodeError, line: int | None = None) -> InputFileError:
    """`path:line:column: not valid JSON (...)`; `line` overrides err.lineno (one JSON-lines line)."""
    return InputFileError(f"{path}:{line or err.lineno}:{err.colno}: not valid JSON ({err.msg})")


def parse_json(text: str, path: PathLike) -> Any:
    """One JSON document, or InputFileError naming the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise json_error(path, err) from None


def read_json(path: PathLike) -> Any:
    """A JSON file's content (UTF-8), with errors naming the file, line and column."""
    return parse_json(read_text(path), path)


def read_json_object(path: PathLike) -> dict[str, Any]:
    """A JSON file that must hold one object (config.json and the like)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise InputFileError(f"{path}: expected a JSON object {{...}}, found {describe(value)}")
    return value


def parse_json_lines(text: str, path: PathLike) -> list[Any]:
    """The values of a JSON-lines text (blank lines skipped); errors name the file's own line number."""
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise json_error(path, err, line=number) from None
    return values


def record_line(text: str, index: int) -> int | None:
    """The line number of the `index`-th record (0-based) of a JSON-lines text, blank lines skipped."""
    seen = -1
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            seen += 1
            if seen == index:
                return number
    return None


def describe(value: Any) -> str:
    """'a number', 'a list', ... for messages about a value of the wrong kind."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")
