"""`SynthesisExample`: one training example of the synthesizer, and its on-disk row format.

An example is a question, K worker branches and the synthesizer's target text. Each branch is
`prefix` (text of the worker's prompt, whose KV is dropped after prefill; "" means the standard
worker prompt for the question), `output` (the worker's text, whose KV is handed over) and
`role_hint` (the worker's per-branch angle added to its system prompt, e.g. a MARBLE expert
profile; "" for none).
Rows are plain JSON objects, so examples round-trip through jsonl and parquet files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

from psynth_jax.formats.records import read_records


@dataclasses.dataclass(frozen=True)
class Branch:
    """One worker branch: prompt text (KV dropped), output text (KV kept), optional role hint."""

    prefix: str
    output: str
    role_hint: str = ""


@dataclasses.dataclass(frozen=True)
class SynthesisExample:
    """A question, its K branches and the synthesizer target.

    meta: JSON-able facts about how the example was made (builder, gold answer, which candidates
    are correct, ...); never fed to the model.
    """

    id: str
    family: str
    question: str
    branches: tuple[Branch, ...]
    target: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "family": self.family,
            "question": self.question,
            "branches": [{"prefix": b.prefix, "output": b.output, "role_hint": b.role_hint} for b in self.branches],
            "target": self.target,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> SynthesisExample:
        """Inverse of to_dict; `meta` may also be a JSON string (the parquet layout)."""
        missing = [k for k in ("id", "family", "question", "branches", "target") if k not in row]
        if missing:
            raise ValueError(f"example row lacks {missing} (has {sorted(row)})")
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        return cls(
            id=str(row["id"]),
            family=str(row["family"]),
            question=str(row["question"]),
            branches=tuple(Branch(str(b.get("prefix") or ""), str(b["output"]), str(b.get("role_hint") or ""))
                           for b in row["branches"]),
            target=str(row["target"]),
            meta=dict(meta),
        )


def is_example_row(row: dict[str, Any]) -> bool:
    """Whether a record is an already-built example (rather than a raw dataset row)."""
    return "branches" in row and "target" in row


def to_json_line(example: SynthesisExample) -> str:
    return json.dumps(example.to_dict(), ensure_ascii=False) + "\n"


def write_examples(path: str | os.PathLike[str], examples: Iterable[SynthesisExample]) -> Path:
    """Write examples to .jsonl (one object per line) or .parquet (via `datasets`; meta as JSON
    text, so rows with different meta keys share one column type), through a temporary file
    renamed over `path` at the end (a failed write leaves `path` as it was)."""
    from psynth_jax.formats.output_files import replace_atomically

    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"unsupported output {path}: use .jsonl or .parquet")
    with replace_atomically(path) as tmp:
        if path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(to_json_line(e) for e in examples)
        else:
            import datasets  # heavy import, only when needed

            rows = [{**e.to_dict(), "meta": json.dumps(e.meta, ensure_ascii=False)} for e in examples]
            datasets.Dataset.from_list(rows).to_parquet(str(tmp))
    return path


def is_examples_file(path: Path, prefix: str = "") -> bool:
    """Whether `path` holds examples written by write_examples (the first row's id starting with
    `prefix`, e.g. "exposure/"): the file build-data may overwrite or resume without --force."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                first = json.loads(next((line for line in f if line.strip()), "null"))
        else:
            first = next(iter(read_records(path)), None)
    except Exception:  # noqa: BLE001 - unreadable as rows: not ours
        return False
    keys = {"id", "question", "branches", "target"}
    return isinstance(first, dict) and keys <= first.keys() and str(first["id"]).startswith(prefix)


def read_examples(source: str | os.PathLike[str]) -> list[SynthesisExample]:
    """Examples from a .jsonl / .json / .parquet file written by write_examples (or a hub id)."""
    return [SynthesisExample.from_dict(r) for r in read_records(source)]
