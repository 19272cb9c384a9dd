"""Evaluation task registry: `load_task(name)` -> list[EvalExample].

Tasks with data shipped beside the project (gsm8k, math500, humaneval, mbpp, arc_challenge,
marble_db) read it from the shared data folder by default. The others (aime2024, aime2025,
gpqa_diamond, medqa, humaneval_plus, mbpp_plus, gaia) have no shippable copy: by default they
name their usual hub dataset, and take a local file or another hub id through `path`.
Any task accepts `path` (file, dataset folder or hub id) in its source schema.
"""

from __future__ import annotations

import dataclasses
import os

from psynth_jax.eval import converters as conv
from psynth_jax.eval.example import EvalExample
from psynth_jax.formats.records import DATA_ENV, Row, data_dir, read_records, record_location, shipped_file

__all__ = ["EvalExample", "TASKS", "TaskSpec", "DATA_ENV", "data_dir", "load_task"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to get a task: its row converter and default source.

    shipped: file under the shared data folder used when no path is given; else `hub` is.
    hub_config / hub_split: defaults for hub ids and dataset folders (the task's usual ones).
    """

    convert: conv.Converter
    shipped: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"


TASKS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec(conv.gsm8k, shipped="gsm8k/test.jsonl"),
    "math500": TaskSpec(conv.math500, shipped="math/math500_test.jsonl"),
    "aime2024": TaskSpec(conv.aime("aime2024"), hub="HuggingFaceH4/aime_2024", hub_split="train"),
    "aime2025": TaskSpec(conv.aime("aime2025"), hub="yentinglin/aime_2025", hub_split="train"),
    "arc_challenge": TaskSpec(conv.arc_challenge,
                              shipped="science_qa/arc_challenge/ARC-Challenge-Test.filtered.jsonl"),
    "gpqa_diamond": TaskSpec(conv.gpqa_diamond, hub="Idavidrein/gpqa", hub_config="gpqa_diamond",
                             hub_split="train"),
    "medqa": TaskSpec(conv.medqa, hub="GBaker/MedQA-USMLE-4-options"),
    "humaneval": TaskSpec(conv.humaneval("humaneval"), shipped="humaneval/HumanEval.jsonl"),
    "humaneval_plus": TaskSpec(conv.humaneval("humaneval_plus"), hub="evalplus/humanevalplus"),
    "mbpp": TaskSpec(conv.mbpp("mbpp"), shipped="mbpp/sanitized-mbpp.json"),
    "mbpp_plus": TaskSpec(conv.mbpp("mbpp_plus"), hub="evalplus/mbppplus"),
    "gaia": TaskSpec(conv.gaia, hub="gaia-benchmark/GAIA", hub_config="2023_all", hub_split="validation"),
    "marble_db": TaskSpec(conv.marble_db, shipped="marble_db/database_main.jsonl"),
}


def load_task(
    name: str,
    path: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    split: str | None = None,
    config: str | None = None,
) -> list[EvalExample]:
    """Examples of task `name`, in source order; `limit` keeps the first `limit` of them.

    path: a local .json/.jsonl(.gz)/.parquet/.csv file, a dataset folder, or a hub id; None uses
    the shipped file (or, for tasks without one, the task's default hub dataset).
    split / config: hub split and config (default: the task's own).
    seed: randomness of the task itself (GPQA option order); same seed, same examples.
    """
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    if path is None and spec.shipped is not None:
        source: str | os.PathLike[str] = shipped_file(spec.shipped)
    elif path is None:
        source = str(spec.hub)
    else:
        source = path
    rows = read_records(source, split=split or spec.hub_split, config=config or spec.hub_config)
    if limit is not None:
        rows = rows[:limit]
    return convert_rows(spec.convert, rows, seed, name, source)


def convert_rows(convert: conv.Converter, rows: list[Row], seed: int, task: str,
                 source: str | os.PathLike[str]) -> list[EvalExample]:
    """Every row through the task's converter; a row it cannot use (a field missing or of the wrong
    kind) is a ValueError naming the task, the file and line (or row) and what is wrong."""
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(convert(row, i, seed))
        except KeyError as err:  # row["field"] of a field the row lacks
            raise ValueError(f"{record_location(source, i)}: {task} row lacks field {err.args[0]!r} "
                             f"(it has {sorted(row)})") from None
        except ValueError as err:  # the converter's own message names the task
            raise ValueError(f"{record_location(source, i)}: {err}") from None
        except (TypeError, AttributeError, IndexError) as err:  # a field of the wrong kind
            raise ValueError(f"{record_location(source, i)}: {task} row has a field of the wrong kind "
                             f"({type(err).__name__}: {err})") from None
    return examples
