"""metrics.jsonl and summary.json of a training run: each step recorded once, real figures kept.

metrics.jsonl holds one line per (step, kind): a train step's loss/grad-norm/tokens-per-second,
or an evaluation (eval_* keys) at that step. A run killed after its last checkpoint (step S) has
logged steps past S that it will redo; so a session resuming from S first drops the lines after
S (a fresh start drops them all: step 0's evaluation is redone too), saying how many, and the
file ends up with every step once, whatever the interruptions.

summary.json is built from that file (eval_before: the step-0 evaluation; eval_after: the
evaluation at the final step; last_losses: the last ten steps' losses) plus this session's data
statistics and throughput. A session that trains nothing (the run was already finished) keeps the
summary it finds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class MetricsLog:
    """metrics.jsonl, cut back to the resumed step on open, appended to and flushed line by line."""

    def __init__(self, run_dir: Path, resume_step: int, *, redo_eval: bool = False, enabled: bool = True):
        """redo_eval: the evaluation at `resume_step` is done again this session (a finished run
        without its summary), so its old line goes too. enabled: False on processes other than 0
        of a multi-process run (they write nothing)."""
        self.path = Path(run_dir) / METRICS
        self.dropped = self._cut_after(resume_step, redo_eval) if enabled else 0
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def _cut_after(self, step: int, redo_eval: bool) -> int:
        """Keep the lines of steps <= `step` (none when step is 0; not the evaluation at `step` with
        `redo_eval`); return how many were dropped. An unparsable line (a write cut short by a
        kill) is dropped too."""
        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            keep = isinstance(row, dict) and step > 0 and isinstance(row.get("step"), int) and row["step"] <= step
            if keep and redo_eval and row["step"] == step and any(k.startswith("eval") for k in row):
                keep = False
            if keep:
                kept.append(line + "\n")
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def append(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None or not metrics:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_at(records: list[dict[str, Any]], step: int) -> dict[str, float] | None:
    """The evaluation (eval_* metrics) recorded at `step`, if any."""
    for r in records:
        if r.get("step") == step and any(k.startswith("eval") for k in r):
            return {k: v for k, v in r.items() if k != "step"}
    return None


def summarize(records: list[dict[str, Any]], final_step: int, **session: Any) -> dict[str, Any]:
    """summary.json's content: the run's figures from its metrics records, plus `session` fields
    (start_step, data statistics, train_tokens_per_s of the steps this session trained)."""
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    summary: dict[str, Any] = dict(session)
    before, after = eval_at(records, 0), eval_at(records, final_step) if final_step > 0 else None
    if before is not None:
        summary["eval_before"] = before
    summary["eval_after"] = after or {}
    summary.update(final_step=final_step, last_losses=[losses[s] for s in sorted(losses)[-10:]])
    return summary


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (Path(run_dir) / SUMMARY).write_text(json.dumps(summary, indent=2))
