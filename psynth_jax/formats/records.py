"""Where evaluation data comes from: the shipped `shared/data` folder, a local file, or the hub.

Local JSON / JSON-lines files (optionally .gz) are read with the json module (fast, exact);
parquet and CSV files, local dataset folders and hub ids all go through
`datasets.load_dataset`, so a user with a downloaded copy and a user with hub access take the
same path and get the same row dicts.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Any

from psynth_jax.formats.text_files import (
    InputFileError, decode_text, describe, parse_json, parse_json_lines, record_line,
)

DATA_ENV = "PSYNTH_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_JSON_SUFFIXES = {".json", ".jsonl"}
_DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")

Row = dict[str, Any]


def data_dir() -> Path:
    """The shipped data folder: $PSYNTH_DATA_DIR, else `shared/data` beside the repository
    checkout (or inside it, as on a machine that carries the checkout with its shared folder)."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={env!r} is not a directory")
        return path
    candidates = [_REPO_ROOT.parent / "shared" / "data", _REPO_ROOT / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"shipped evaluation data not found at {' or '.join(map(str, candidates))}; "
        f"set {DATA_ENV} to the folder, or pass the task a file path or hub id"
    )


def shipped_file(relative: str) -> Path:
    """A file of the shipped data folder, with an error that says where it was looked for."""
    path = data_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path} (data folder from {DATA_ENV} or shared/data)")
    return path


def _read_json_file(path: Path) -> list[Row]:
    """Rows of a JSON array file or a JSON-lines file (.gz too); errors name the file and line."""
    opener = gzip.open if path.suffixes[-1] == ".gz" else open
    with opener(path, "rb") as f:
        text = decode_text(f.read(), path)
    lines = ".jsonl" in path.suffixes or not text.lstrip().startswith("[")
    rows = parse_json_lines(text, path) if lines else parse_json(text, path)
    if not isinstance(rows, list):
        raise InputFileError(f"{path}: expected a JSON array of objects (or one object per line), "
                             f"found {describe(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"{path}:{record_line(text, i)}" if lines else f"{path}: item {i}"
            raise InputFileError(f"{where}: expected a JSON object with named fields, found {describe(row)}")
    return rows


def record_location(source: str | os.PathLike[str], index: int) -> str:
    """Where the `index`-th row (0-based) of `source` is, for an error message: `file:line` for a
    JSON-lines file, `file: item N` for a JSON array, `source: row N` otherwise."""
    path = Path(source).expanduser()
    suffixes = [s for s in path.suffixes if s != ".gz"]
    if path.is_file() and suffixes and suffixes[-1] in _JSON_SUFFIXES:
        opener = gzip.open if path.suffixes[-1] == ".gz" else open
        with opener(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        if ".jsonl" in path.suffixes or not text.lstrip().startswith("["):
            line = record_line(text, index)
            if line is not None:
                return f"{path}:{line}"
        else:
            return f"{path}: item {index}"
    return f"{source}: row {index}"


def _load_dataset(*args: Any, **kwargs: Any) -> list[Row]:
    import datasets  # heavy import, only when needed

    return [dict(row) for row in datasets.load_dataset(*args, **kwargs)]


def _load_data_files(where: Path, *args: Any, **kwargs: Any) -> list[Row]:
    """`_load_dataset` over local files, its failures (a corrupt parquet, a folder of unreadable
    files) as one InputFileError naming the file when the library's message names it, else `where`."""
    try:
        return _load_dataset(*args, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, InputFileError):
            raise
        raise InputFileError(f"{where}: cannot be read as data rows ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - DatasetGenerationError, ArrowInvalid, ...: name the file
        cause = err.__cause__ or err.__context__ or err
        named = re.search(r"(/[^\s'\"]+\.(?:parquet|csv|arrow|jsonl?))", f"{err} {cause}")
        bad = named.group(1) if named else str(where)
        raise InputFileError(f"{bad}: cannot be read as data rows ({type(cause).__name__}: {_first_line(cause)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _load_hub_dataset(source: str, config: str | None, split: str) -> list[Row]:
    """A hub dataset's rows; when it cannot be fetched (offline, unknown id), one error naming both
    readings of `source`: a local path that does not exist, and the hub id that failed."""
    try:
        return _load_dataset(source, config, split=split)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # ConnectionError offline, DatasetNotFoundError, HTTP errors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"{source!r} is not a local file or folder (relative paths are read from {os.getcwd()}), and as a "
            f"hub dataset id it could not be loaded ({type(err).__name__}: {reason}); write a local path as "
            f"./{source} to mean a file"
        ) from err


def _looks_like_path(source: str) -> bool:
    s = source.strip()
    known = _JSON_SUFFIXES | set(_DATASETS_BUILDERS) | {".gz"}
    return s.startswith(("/", ".", "~")) or Path(s).suffix in known or not _HUB_ID_RE.match(s)


def read_records(source: str | os.PathLike[str], *, split: str = "train", config: str | None = None) -> list[Row]:
    """Rows of a local file / dataset folder, or of a hub dataset (`config`, `split` apply to hub
    ids and folders). A path that does not exist raises FileNotFoundError; only a name shaped like
    "owner/name" (no file suffix) is treated as a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        suffixes = [s for s in path.suffixes if s != ".gz"]
        if suffixes and suffixes[-1] in _JSON_SUFFIXES:
            return _read_json_file(path)
        if path.suffix in _DATASETS_BUILDERS:
            return _load_data_files(path, _DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train")
        raise ValueError(f"unsupported file type {path}: use .json, .jsonl(.gz), .parquet or .csv")
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
        data = [p for p in files if p.suffix in _JSON_SUFFIXES | set(_DATASETS_BUILDERS) | {".arrow", ".gz", ".tsv"}]
        if not data:
            shown = ", ".join(sorted(p.name for p in files)[:5]) + (" ..." if len(files) > 5 else "")
            raise InputFileError(f"{path}: a folder with no data files (.jsonl, .json, .parquet, .csv, .arrow); "
                                 f"it holds {shown or 'nothing'}")
        return _load_data_files(path, str(path), config, split=split)
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        raise FileNotFoundError(f"no such data file or folder: {path}")
    return _load_hub_dataset(str(source), config, split)
