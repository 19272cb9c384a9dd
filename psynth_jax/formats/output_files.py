"""The one policy for every file a command writes for the user (build-data's --out, plan's --json).

Checked before anything heavy runs (`check_output_file`), so a refused output costs nothing:
- a path on the way that is a regular file (`--out notes.txt/x.jsonl`) is refused;
- the output must not be one of the command's own inputs (`--source X.jsonl --out X.jsonl`);
- an existing non-empty file the command did not write itself (`ours` says which files it
  recognises, e.g. examples of the same builder) is refused unless `--force`.
Then the file is written to a temporary file beside it and renamed over it (`replace_atomically`),
so an interrupted or failed write leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence


class OutputFileError(ValueError):
    """An output path the command refuses to write (the message names the flag and the reason)."""


def check_parents(out: Path, flag: str) -> None:
    """No existing regular file at a folder position of `out` (it could never be created)."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputFileError(f"{flag} {out}: {parent} is a file, not a directory")
            return


def input_files(source: str | os.PathLike[str]) -> list[Path]:
    """The local files a source names: itself, every file under a folder, or a glob's matches."""
    text = os.path.expanduser(str(source))
    if os.path.isdir(text):
        return [p for p in Path(text).rglob("*") if p.is_file()]
    if os.path.exists(text):
        return [Path(text)]
    return [Path(m) for m in glob.glob(text, recursive=True) if os.path.isfile(m)]


def check_output_file(out: str | os.PathLike[str], flag: str, *, inputs: Sequence[str | os.PathLike[str]] = (),
                      force: bool = False, ours: Callable[[Path], bool] | None = None) -> Path:
    """`out` as a file this command may write: no directory, no file on its way, none of `inputs`,
    and, when it exists with content, a file `ours` recognises or `force` given."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise OutputFileError(f"{flag} {out} is a directory; give a file path")
    check_parents(out, flag)
    if not out.exists():
        return out
    for source in inputs:
        for f in input_files(source):
            if f.exists() and os.path.samefile(f, out):
                raise OutputFileError(f"{flag} {out} is the input {source}; writing it would destroy the input, "
                                      "choose another file")
    if out.stat().st_size > 0 and not force and not (ours is not None and ours(out)):
        raise OutputFileError(f"{flag} {out} exists and was not written by this command ({out.stat().st_size} bytes); "
                              "pass --force to replace it, or choose another file")
    return out


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write; on success it replaces `path`,
    on failure it is removed and `path` is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.psynth-tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
