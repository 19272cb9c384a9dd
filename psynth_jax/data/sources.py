"""Reading sources: rows of a local file or hub dataset -> problems -> examples.

A source whose rows are already examples (`branches` and `target` columns, e.g. the output of
`psynth build-data`) is read as is, whatever its builder; raw GSM8K / MATH rows go through the
source's builder. Distillation needs a model, so its sources must be prebuilt example files.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from psynth_jax.config.schema import DataSourceConfig
from psynth_jax.data.builders import build_examples
from psynth_jax.data.examples import SynthesisExample, is_example_row
from psynth_jax.data.problems import Problem, parse_problem
from psynth_jax.formats.records import read_records, record_location

log = logging.getLogger(__name__)


def source_label(source: str, split: str) -> str:
    """A short stable name for ids: "<folder>/<stem>" of a file, "<hub id>/<split>" otherwise."""
    path = Path(source).expanduser()
    if path.exists():
        return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return f"{source}/{split}"


def read_rows(source: str, *, split: str = "train", subset: str | None = None, limit: int | None = None
              ) -> list[dict[str, Any]]:
    """The first `limit` rows of a local file / dataset folder / hub id (FileNotFoundError naming
    a missing local path)."""
    rows = read_records(source, split=split, config=subset)
    return rows if limit is None else rows[:limit]


def parse_problems(rows: Sequence[dict[str, Any]], label: str, source: str | None = None
                   ) -> tuple[list[Problem], int]:
    """(problems, number of rows without a final answer). A row in neither schema is a ValueError
    naming where it is (`source`'s file and line when given, else the label and row number)."""
    problems, missing = [], 0
    for i, row in enumerate(rows):
        try:
            p = parse_problem(row, i, label)
        except ValueError as err:
            where = record_location(source, i) if source is not None else f"{label}: row {i}"
            raise ValueError(f"{where}: {err}") from None
        if p is None:
            missing += 1
        else:
            problems.append(p)
    return problems, missing


Distiller = Callable[[DataSourceConfig, list[Problem]], list[SynthesisExample]]


def load_source(
    src: DataSourceConfig, num_branches: int, seed: int, distiller: Distiller | None = None
) -> list[SynthesisExample]:
    """Examples of one configured source (prebuilt rows read as is, raw rows built).

    Raw rows of a distillation source need the backbone: `distiller` generates them (the trainer
    passes one that caches them in the run directory); without it they are an error.
    """
    rows = read_rows(src.path, split=src.split, subset=src.subset, limit=src.limit)
    if rows and is_example_row(rows[0]):
        examples = []
        for i, row in enumerate(rows):
            try:
                examples.append(SynthesisExample.from_dict(row))
            except ValueError as err:
                raise ValueError(f"{record_location(src.path, i)}: {err}") from None
        return examples
    problems, missing = parse_problems(rows, source_label(src.path, src.split), src.path)
    if src.builder == "distillation":
        if distiller is None:
            raise ValueError(
                f"{src.path}: distillation sources must be example files made by "
                "`psynth build-data --builder distillation` (they hold `branches` and `target`)"
            )
        return distiller(src, problems)
    result = build_examples(problems, src.builder, num_branches, seed)
    skipped = collections.Counter(result.skipped)
    if missing:
        skipped["no final answer"] += missing
    if skipped:
        log.warning("%s (%s): skipped %s", src.path, src.builder, dict(skipped))
    return result.examples


def load_examples(
    sources: Sequence[DataSourceConfig], num_branches: int, seed: int, distiller: Distiller | None = None
) -> list[SynthesisExample]:
    """All sources' examples, in source order (the pipeline shuffles)."""
    return [e for src in sources for e in load_source(src, num_branches, seed, distiller)]
