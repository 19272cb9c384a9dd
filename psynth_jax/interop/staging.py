"""Export output directories that never lose or mix files.

`staged_output(out, force=..., protect=...)` checks `out` before anything is loaded or written,
then lets the caller write into a fresh hidden directory beside it. Only when the whole export
succeeded does that directory take `out`'s place (the previous contents, when `--force` allowed
replacing them, are removed then). So:

- a backbone's own directory, the input being exported, or a folder containing either, is
  refused outright (`--force` would delete them);
- a non-empty `out` is refused unless `force`; `out` that is a file is an error;
- a failed export leaves `out` exactly as it was, and no empty directory behind;
- an export never leaves a stale file (a mapper from an earlier export) beside new ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from psynth_jax.formats.output_files import OutputFileError, check_parents


class ExportError(ValueError):
    """An export refused before writing anything (the message names the path and the reason)."""


def check_output(out: str | Path, *, force: bool, protect: Sequence[tuple[str, str | Path]] = ()) -> Path:
    """Validate `out` for an export; `protect`: (what, path) pairs it must not overwrite."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory to write the export into")
    try:
        check_parents(out, "--out")
    except OutputFileError as err:
        raise ExportError(str(err)) from None
    target = out.resolve()
    for what, path in protect:
        p = Path(path).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if target == p or target in p.parents:
            where = "is" if target == p else "contains"
            raise ExportError(f"--out {out} {where} the {what} ({p}); choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        entries = sorted(e.name for e in out.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(f"--out {out} is not empty ({len(entries)} entries: {shown}); pass --force to replace "
                          "its contents")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, *, force: bool,
                  protect: Sequence[tuple[str, str | Path]] = ()) -> Iterator[Path]:
    """Yield an empty directory to write the export into; on success it becomes `out`."""
    out = check_output(out, force=force, protect=protect)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.psynth-staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for p in created:  # innermost first: only the directories this export made, if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.psynth-replaced-{os.getpid()}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old)
