"""A local stand-in for Google Cloud Storage: gs://bucket/key is <root>/bucket/key on this disk.

etils.epath (the path library Orbax uses, and formats/paths.py) sends gs:// paths to fsspec's "gs"
filesystem when TensorFlow is absent. Registering a local filesystem under that name makes every
epath operation on gs:// local, with no network and no extra package, so tests exercise the real
remote code path (epath.Path, whole-object rewrites) against files they can inspect. Orbax's array
bytes go through TensorStore's own gcs driver, which this does not cover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import fsspec
import pytest
from etils.epath import backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry


def _install(root: Path) -> None:
    class LocalGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        def _join(self, path):  # "gs://bucket/a" -> "<root>/bucket/a"
            if isinstance(path, str):
                path = path.removeprefix("gs://").removeprefix("gcs://")
            return super()._join(path)

        def _relpath(self, path):  # results as gcsfs gives them: "bucket/a" (epath adds the scheme)
            out = super()._relpath(path)
            return out.lstrip("/") if isinstance(out, str) else [p.lstrip("/") for p in out]

    fsspec.register_implementation("gs", LocalGCS, clobber=True)
    fsspec.register_implementation("gcs", LocalGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps one filesystem per scheme


@pytest.fixture
def local_gcs(tmp_path) -> Iterator[Path]:
    """gs:// paths routed to a temporary folder (yielded: the folder that holds the buckets)."""
    root = tmp_path / "gcs"
    root.mkdir()
    _install(root)
    yield root
    for scheme in ("gs", "gcs"):
        _registry.pop(scheme, None)  # fsspec.registry is a read-only view of it
    backend.fsspec_backend._get_filesystem.cache_clear()
