"""Reading one field of a dataset row, and the error for a row that lacks what a converter needs.

A converter that meets a row without a field it needs raises `RowError`; the caller skips the
row and counts it under `reason` (a short label such as "no answer"), so one bad row costs one
example, never the run, and the data summary says how many rows each reason cost.
"""

from __future__ import annotations

import json
from typing import Any


class RowError(ValueError):
    """A row a converter cannot use; `reason` is the label it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def present(value: Any) -> bool:
    """Not None and, for text and containers, not empty."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple, dict)):
        return bool(value)
    return True


def need(row: dict[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` present in `row`; RowError("no <first key>") otherwise."""
    for key in keys:
        if present(row.get(key)):
            return row[key]
    raise RowError(f"no {keys[0]}", f"none of {list(keys)} in a row with fields {sorted(row)}")


def text_value(value: Any, key: str, *, numbers: bool = False) -> str:
    """`value` of field `key` as text: a string (or, `numbers`, an int / float such as an answer
    72), never a list, a mapping or a bool turned into its repr; a ValueError naming the field."""
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    shown = clip(repr(value), 80)
    raise ValueError(f"field {key!r} must be text{' or a number' if numbers else ''}, got "
                     f"{type(value).__name__} {shown}")


def need_text(row: dict[str, Any], *keys: str, numbers: bool = False) -> str:
    """`need` for a text field: the first of `keys` present, checked by `text_value`."""
    for key in keys:
        if present(row.get(key)):
            return text_value(row[key], key, numbers=numbers)
    return text_value(need(row, *keys), keys[0], numbers=numbers)


def maybe_json(value: Any) -> Any:
    """A JSON list / object stored as text (some hub exports do this), decoded; anything else as is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def clip(text: str, chars: int = 300) -> str:
    """A row (or any text) shortened for an error message."""
    return text if len(text) <= chars else text[:chars] + " ..."
