"""The run directory of an evaluation: what makes an interrupted eval resumable.

    out_dir/
      run.json        the result-defining config fields (a resumed run must match them)
      config.yaml     the resolved config of the latest session
      weights.json    which trained weights (mapper, LoRA) the synthesizer held
      branches.jsonl  one line per example: its worker branches (token ids + texts)
      records.jsonl   one line per (task, example id, mode): answer, correctness, TTFT, tokens;
                      a later line for the same key supersedes an earlier one (--retime appends)
      results.json, results.md, *.png   written by the report at the end of every session

Lines are appended and flushed as soon as their work finishes. A line cut short by an
interruption is dropped (and truncated away) on the next open, so it is simply redone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from psynth_jax.config.resume import differing_fields, flatten
from psynth_jax.formats.text_files import read_json_object

BRANCHES = "branches.jsonl"
RECORDS = "records.jsonl"
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
    """An append-only JSON-lines file whose torn last line (an interrupted write) is repaired on open."""

    def __init__(self, path: Path):
        self.path = path
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
        if len(complete) < len(data):
            with self.path.open("r+b") as f:
                f.truncate(len(complete))

    def append(self, rows: list[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)


class RunStore:
    """The branches and records of one run directory, keyed for resuming."""

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], config_yaml: str):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_meta(meta)
        (self.dir / CONFIG).write_text(config_yaml)
        self._branches = JsonlLog(self.dir / BRANCHES)
        self._records = JsonlLog(self.dir / RECORDS)
        self.branches = {(r["task"], r["id"]): BranchSet(**r) for r in self._branches.rows}
        self.records = {(r["task"], r["id"], r["mode"]): ModeRecord(**r) for r in self._records.rows}

    def _check_meta(self, meta: dict[str, Any]) -> None:
        """Refuse to mix runs: stored branches/records must come from the same result-defining config."""
        path = self.dir / RUN_META
        if path.is_file():
            old = read_json_object(path)
            diff = differing_fields(old, meta)  # paths naming the same file are equal (config/resume.py)
            if diff:
                stored, now = flatten(old), flatten(meta)
                details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}" for k in diff)
                raise ValueError(f"{self.dir} holds an eval run with a different config ({details}); "
                                 "resume it with the same values or choose another out_dir")
        else:
            path.write_text(json.dumps(meta, indent=2) + "\n")

    def weights(self) -> dict[str, Any] | None:
        """What the synthesizer's mapper and LoRA held when the records were made (None: not yet known)."""
        path = self.dir / WEIGHTS
        return json.loads(path.read_text()) if path.is_file() else None

    def save_weights(self, info: dict[str, Any]) -> None:
        (self.dir / WEIGHTS).write_text(json.dumps(info, indent=2) + "\n")

    def add_branches(self, sets: list[BranchSet]) -> None:
        self._branches.append([dataclasses.asdict(s) for s in sets])
        self.branches.update({(s.task, s.id): s for s in sets})

    def add_records(self, records: list[ModeRecord]) -> None:
        self._records.append([dataclasses.asdict(r) for r in records])
        self.records.update({r.key: r for r in records})
