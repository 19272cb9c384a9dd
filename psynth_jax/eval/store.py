"""The run directory of an evaluation: what makes an interrupted eval resumable.

    out_dir/
      run.json        the result-defining config fields (a resumed run must match them)
      config.yaml     the resolved config of the latest session
      weights.json    which trained weights (mapper, LoRA) the synthesizer held
      branches.jsonl  one line per example: its worker branches (token ids + texts)
      records.jsonl   one line per (task, example id, mode): answer, correctness, TTFT, tokens;
                      a later line for the same key supersedes an earlier one (--retime appends)
      kl.jsonl        one line per (task, example id, cache mode): the teacher-forced KL(text || mode)
                      on the text path's answer (`psynth eval --kl`), whether or not the mode answered
      results.json, results.md, *.png   written by the report at the end of every session

Lines are appended and flushed as soon as their work finishes. A line cut short by an
interruption is dropped (and truncated away) on the next open, so it is simply redone.
out_dir may be remote (gs://bucket/eval, formats/paths.py): a multi-host eval then needs no
shared filesystem; its files are objects rewritten whole at each append.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator

from psynth_jax.config.resume import differing_fields, flatten
from psynth_jax.formats.paths import AnyPath, append_text, as_path, is_remote, replace_text
from psynth_jax.formats.text_files import read_json_object

BRANCHES = "branches.jsonl"
RECORDS = "records.jsonl"
KL = "kl.jsonl"
RUN_META = "run.json"
CONFIG = "config.yaml"
WEIGHTS = "weights.json"


@dataclasses.dataclass
class BranchSet:
    """One example's worker branches: output token ids (stop token stripped) and texts, per worker.

    error: why the worker stage could not run for this example (e.g. prompt too long); then
    tokens and texts are empty and only the single-agent mode can answer it.
    """

    task: str
    id: str
    seed: int
    tokens: list[list[int]]
    texts: list[str]
    error: str | None = None

    def usable(self) -> list[int]:
        """Indices of branches with at least one output token (an empty branch has no KV to hand over)."""
        return [j for j, t in enumerate(self.tokens) if t]


@dataclasses.dataclass
class ModeRecord:
    """One mode's answer to one example.

    ttft_s: time to first token of this request run alone (batch 1), None when not timed or on
    error; breakdown: its parts (cache path: prepare_s + prefill_s), seconds.
    branch_tokens: output tokens of the branches this mode was given (0 for single).
    prompt_tokens: live tokens the mode prefilled (text: question + every branch's text).
    device: the accelerator that ran it (a resumed run may have moved; the report says so).
    The mode's KL from the text path is kept apart (kl.jsonl, `RunStore.kl`): it needs no answer.
    """

    task: str
    id: str
    mode: str
    answer: str
    correct: bool
    text: str
    output_tokens: int
    prompt_tokens: int
    branch_tokens: int
    num_branches: int
    ttft_s: float | None
    breakdown: dict[str, float]
    device: str
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.task, self.id, self.mode


Key = tuple[str, str, str]  # (task, example id, mode)


def split_records(rows: list[dict[str, Any]]) -> tuple[dict[Key, ModeRecord], dict[Key, float | None]]:
    """records.jsonl rows -> (records, KL values) by key, a later row superseding an earlier one.

    Runs made before kl.jsonl existed kept each cache mode's KL in its answer record
    (`kl_from_text`); such a value is returned as a KL value, so those runs read as they did.
    """
    records: dict[Key, ModeRecord] = {}
    kl: dict[Key, float | None] = {}
    for row in rows:
        row = dict(row)
        legacy = row.pop("kl_from_text", None)
        record = ModeRecord(**row)
        records[record.key] = record
        if legacy is not None:
            kl[record.key] = legacy
        else:
            kl.pop(record.key, None)
    return records, kl


def kl_rows(rows: list[dict[str, Any]]) -> dict[Key, float | None]:
    """kl.jsonl rows -> KL value by key (None: not measurable, e.g. an empty text answer)."""
    return {(r["task"], r["id"], r["mode"]): r["kl_from_text"] for r in rows}


def _clean(value: Any) -> Any:
    """NaN / inf -> None, so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlLog:
    """An append-only JSON-lines file whose torn last line (an interrupted write) is repaired on open.

    repair=False reads another process's file: a torn last line is skipped, not cut off (that
    process may be writing it).
    """

    def __init__(self, path: AnyPath, repair: bool = True):
        self.path = path
        self.repair = repair
        self.rows: list[dict[str, Any]] = list(self._read_and_repair())

    def _read_and_repair(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a write cut short leaves a tail without newline
        for number, line in enumerate(complete.splitlines(), 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}:{number}: corrupt line ({err}); remove it to resume") from None
        if len(complete) < len(data) and self.repair:
            if is_remote(self.path):
                self.path.write_bytes(complete)
            else:
                with self.path.open("r+b") as f:
                    f.truncate(len(complete))

    def append(self, rows: list[dict[str, Any]]) -> None:
        append_text(self.path, "".join(json.dumps(_clean(row), ensure_ascii=False) + "\n" for row in rows))
        self.rows.extend(rows)


def part_name(name: str, part: int | None) -> str:
    """records.jsonl -> records.p<part>.jsonl (None: the file itself)."""
    if part is None:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.p{part}{dot}{suffix}"


class RunStore:
    """The branches and records of one run directory, keyed for resuming.

    part: in a multi-process eval, process i appends to its own branches.p<i>.jsonl and
    records.p<i>.jsonl (no two processes write one file); every process reads them all, so a
    resumed run skips what any process finished, and `merge_parts` (process 0, once every
    process is done) folds them into branches.jsonl / records.jsonl, each key once.
    """

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], config_yaml: str, part: int | None = None):
        self.dir = as_path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part = part
        self._check_meta(meta, write=part in (None, 0))
        if part in (None, 0):
            (self.dir / CONFIG).write_text(config_yaml)
        self._branches = JsonlLog(self.dir / part_name(BRANCHES, part))
        self._records = JsonlLog(self.dir / part_name(RECORDS, part))
        self.branches = {(r["task"], r["id"]): BranchSet(**r) for r in self._rows(BRANCHES)}
        self.records, self.kl = split_records(self._rows(RECORDS))
        # measured by one process only (`psynth eval --kl`): no part files
        self._kl = JsonlLog(self.dir / KL, repair=part in (None, 0))
        self.kl.update(kl_rows(self._kl.rows))

    def _files(self, name: str) -> list[AnyPath]:
        """The merged file, then every process's part, in order (later lines supersede earlier)."""
        stem, _, suffix = name.partition(".")
        parts = sorted(self.dir.glob(f"{stem}.p*.{suffix}"), key=lambda p: int(p.name.split(".")[1][1:]))
        return [p for p in [self.dir / name, *parts] if p.is_file()]

    def _rows(self, name: str) -> list[dict[str, Any]]:
        own = self._branches if name == BRANCHES else self._records
        return [r for path in self._files(name)
                for r in (own.rows if path == own.path else JsonlLog(path, repair=False).rows)]

    def merge_parts(self) -> None:
        """Fold every process's part files into branches.jsonl / records.jsonl (each key once, the
        latest line winning), written to a temporary file and renamed, then remove the parts."""
        for name, key in ((BRANCHES, ("task", "id")), (RECORDS, ("task", "id", "mode"))):
            files = self._files(name)
            if len(files) <= 1 and (not files or files[0].name == name):
                continue
            merged: dict[tuple, dict[str, Any]] = {}
            for path in files:
                for row in JsonlLog(path).rows:
                    merged[tuple(row[k] for k in key)] = row
            replace_text(self.dir / name,
                         "".join(json.dumps(_clean(row), ensure_ascii=False) + "\n" for row in merged.values()))
            for path in files:
                if path.name != name:
                    path.unlink()

    def _check_meta(self, meta: dict[str, Any], write: bool = True) -> None:
        """Refuse to mix runs: stored branches/records must come from the same result-defining config."""
        path = self.dir / RUN_META
        if path.is_file():
            old = json.loads(path.read_text()) if is_remote(path) else read_json_object(path)
            diff = differing_fields(old, meta)  # paths naming the same file are equal (config/resume.py)
            if diff:
                stored, now = flatten(old), flatten(meta)
                details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}" for k in diff)
                raise ValueError(f"{self.dir} holds an eval run with a different config ({details}); "
                                 "resume it with the same values or choose another out_dir")
        elif write:  # whole or not at all: another process of a pod may be reading it
            replace_text(path, json.dumps(meta, indent=2) + "\n")

    def weights(self) -> dict[str, Any] | None:
        """What the synthesizer's mapper and LoRA held when the records were made (None: not yet known)."""
        path = self.dir / WEIGHTS
        return json.loads(path.read_text()) if path.is_file() else None

    def save_weights(self, info: dict[str, Any]) -> None:
        replace_text(self.dir / WEIGHTS, json.dumps(info, indent=2) + "\n")

    def add_branches(self, sets: list[BranchSet]) -> None:
        self._branches.append([dataclasses.asdict(s) for s in sets])
        self.branches.update({(s.task, s.id): s for s in sets})

    def add_records(self, records: list[ModeRecord]) -> None:
        self._records.append([dataclasses.asdict(r) for r in records])
        self.records.update({r.key: r for r in records})

    def add_kl(self, values: dict[Key, float | None]) -> None:
        """Append measured KL values (None or NaN: not measurable); a later line supersedes an earlier one."""
        clean = {k: None if v is None or not math.isfinite(v) else v for k, v in values.items()}
        self._kl.append([{"task": t, "id": i, "mode": m, "kl_from_text": v} for (t, i, m), v in clean.items()])
        self.kl.update(clean)
