"""Paths that may name an object store (gs://bucket/...), through etils.epath, the path library Orbax uses.

`pathlib.Path("gs://bucket/run")` is the local path "gs:/bucket/run": code that builds run paths
with pathlib silently writes a remote directory to the working directory. `as_path` keeps a
local path a `pathlib.Path` and makes a remote one an `epath.Path` (gs:// through tf.io.gfile when
TensorFlow is installed, else fsspec's gcsfs), which has the same methods: `/`, read_text,
write_text, open, glob, exists, mkdir, unlink, replace.

Object stores cannot append to an object, and have no fsync: `append_text` appends to a local
file (flushed and synced, so a crash loses at most the line being written) and rewrites a remote
object whole with the new text at its end (each rewrite is atomic: a reader sees the old object
or the new one, never a torn line).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from etils import epath

AnyPath = Union[Path, epath.Path]


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (a scheme://), not the local filesystem."""
    return "://" in str(path)


def as_path(path: str | os.PathLike) -> AnyPath:
    """A remote path as an `epath.Path`, a local one as a `pathlib.Path`."""
    return epath.Path(str(path)) if is_remote(path) else Path(path)


def append_text(path: AnyPath, text: str) -> None:
    """Append `text` to the file at `path` (module doc: local append + fsync, remote whole rewrite)."""
    if is_remote(path):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(old + text, encoding="utf-8")
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_text(path: AnyPath, text: str) -> None:
    """Write `path` whole so that a reader never sees a partial file: a local temporary file renamed
    over it (one per process: the processes of a pod may write the same file); a remote object is
    written whole by the store anyway."""
    if is_remote(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.writing")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
