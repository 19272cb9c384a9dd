"""Which differences between a run's stored config and the current one forbid resuming it.

A resumed run (training or eval) must be the same experiment, but the same experiment may be
spelled differently: the run directory given as `a/./b` or `/abs/a/b`, moved elsewhere, or a
data file named relative to another working directory. So the run directory's own field is
never compared (where the run is now is where it is), and two path strings that name the same
existing file or folder are equal.
"""

from __future__ import annotations

import os
from typing import Any, Iterable


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists kept whole; list items of mappings as "a[0].b")."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, dict) for v in tree):
        out = {f"{prefix}#len": len(tree)}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def same_value(old: Any, new: Any) -> bool:
    """Equal, or two strings naming the same existing local file or folder."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and "://" not in old + new:
        a, b = os.path.expanduser(old), os.path.expanduser(new)
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    return False


def differing_fields(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Dotted names of the fields whose stored and current values differ (`ignore`d ones and those
    under an ignored section excepted), sorted."""
    skip = tuple(ignore)
    flat_old, flat_new = flatten(old), flatten(new)
    return sorted(
        key.removesuffix("#len") for key in flat_old.keys() | flat_new.keys()
        if not any(key == s or key.startswith((s + ".", s + "[", s + "#")) for s in skip)
        and not same_value(flat_old.get(key), flat_new.get(key))
    )
