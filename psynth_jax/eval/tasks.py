"""Evaluation task registry: `load_task(name)` -> list[EvalExample].

Tasks with data shipped beside the project (gsm8k, math500, humaneval, mbpp, arc_challenge,
marble_db, multihop_qa, tool_calls) read it from the shared data folder by default. The others
(aime2024, aime2025, gpqa_diamond, medqa, humaneval_plus, mbpp_plus, gaia) have no shippable
copy: by default they name their usual hub dataset, and take a local file or another hub id
through `path`. Any task accepts `path` (file, dataset folder or hub id) in its source schema.
The generic tasks mc (multiple choice) and qa (short answers, optional context paragraphs as
branches) read a user's own file, its column names given as `fields` in the eval config.

multihop_qa and tool_calls read rows that training also reads (multihop_evidence/, tool_calls/):
they evaluate only the rows formats/splits.py holds out, which the training builders skip.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Callable, Sequence

from psynth_jax.config.eval_schema import EvalConfig, EvalTaskConfig, TaskFields
from psynth_jax.config.typed import ConfigError
from psynth_jax.eval import converters as conv
from psynth_jax.eval.example import EvalExample
from psynth_jax.formats import splits, tool_calls
from psynth_jax.formats.records import DATA_ENV, Row, data_dir, read_records, record_location, shipped_file

__all__ = ["EvalExample", "TASKS", "TaskSpec", "DATA_ENV", "check_task_names", "data_dir", "load_examples",
           "load_task", "task_converter", "unknown_task"]

ConverterFactory = Callable[[TaskFields, "int | None"], conv.Converter]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to get a task: its row converter and default source.

    convert: the row converter, or `configure`: a factory making it from the task's options
      (fields, branches) for the generic tasks and the tasks with given branches.
    shipped: file(s) under the shared data folder used when no path is given; else `hub` is.
    hub_config / hub_split: defaults for hub ids and dataset folders (the task's usual ones).
    heldout: the formats/splits.py collection whose held-out rows alone are evaluated (None: all rows).
    """

    convert: conv.Converter | None = None
    configure: ConverterFactory | None = None
    shipped: str | tuple[str, ...] | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    heldout: str | None = None


_MULTIHOP_FILES = tuple(f"multihop_evidence/{f}.jsonl" for f in (
    "2wikimultihopqa_eval164_migres", "2wikimultihopqa_train500_migres", "hotpotqa_200_migres",
    "hotpotqa_train100_hipporag", "musique_100_migres", "musique_train100_hipporag"))
_TOOL_FILES = ("tool_calls/BFCL_v4_multiple.json", "tool_calls/BFCL_v4_parallel_multiple.json")


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
    "multihop_qa": TaskSpec(configure=conv.multihop_qa, shipped=_MULTIHOP_FILES, heldout=splits.MULTIHOP),
    "tool_calls": TaskSpec(configure=conv.tool_calls_task, shipped=_TOOL_FILES, heldout=splits.TOOL_CALLS),
    "mc": TaskSpec(configure=conv.generic_mc),
    "qa": TaskSpec(configure=conv.generic_qa),
}


def task_converter(name: str, fields: TaskFields | None = None, branches: int | None = None) -> conv.Converter:
    """Task `name`'s row converter, built from its options where it takes them."""
    spec = TASKS[name]
    if spec.configure is not None:
        return spec.configure(fields or TaskFields(), branches)
    assert spec.convert is not None, name
    return spec.convert


def _read(source: str | os.PathLike[str], split: str, config: str | None) -> list[Row]:
    """Rows of one source; a local BFCL question file gets its gold calls (possible_answer/) attached."""
    rows = read_records(source, split=split, config=config)
    if rows and tool_calls.is_bfcl_row(rows[0]) and Path(source).expanduser().is_file():
        rows = tool_calls.attach_answers(rows, source)
    return rows


def unknown_task(name: str, where: str, label: str = "known tasks") -> str | None:
    """The error of a task name the registry does not know (None when it does), naming `where`."""
    if name in TASKS:
        return None
    known = sorted(TASKS)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown task {name!r}{hint}; {label}: {', '.join(known)}"


def check_task_names(tasks: Sequence[EvalTaskConfig]) -> None:
    """ConfigError listing every `tasks[i].name` of an eval config that names no task."""
    errors = [e for i, t in enumerate(tasks) if (e := unknown_task(t.name, f"tasks[{i}].name"))]
    if errors:
        raise ConfigError(errors)


def load_task(
    name: str,
    path: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    split: str | None = None,
    config: str | None = None,
    fields: TaskFields | None = None,
    branches: int | None = None,
) -> list[EvalExample]:
    """Examples of task `name`, in source order; `limit` keeps the first `limit` of them.

    path: a local .json/.jsonl(.gz)/.parquet/.csv file, a dataset folder, or a hub id; None uses
    the shipped file(s) (or, for tasks without one, the task's default hub dataset).
    split / config: hub split and config (default: the task's own).
    seed: randomness of the task itself (GPQA option order, given branches); same seed, same examples.
    fields / branches: the options of the generic tasks and of the tasks with given branches.
    A task with a held-out collection keeps only its held-out rows (before `limit`).
    """
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    if path is None and spec.shipped is None and spec.hub is None:
        raise ValueError(f"task {name!r} reads your own file: pass its path")
    split, config = split or spec.hub_split, config or spec.hub_config
    source: str | os.PathLike[str]
    if path is not None:
        source, rows = path, _read(path, split, config)
    elif spec.shipped is not None:
        files = [shipped_file(f) for f in ((spec.shipped,) if isinstance(spec.shipped, str) else spec.shipped)]
        rows = [r for f in files for r in _read(f, split, config)]
        source = files[0] if len(files) == 1 else ", ".join(map(str, files))
    else:
        source = str(spec.hub)
        rows = _read(source, split, config)
    convert = task_converter(name, fields, branches)
    if spec.heldout is None:
        rows = rows if limit is None else rows[:limit]
        return convert_rows(convert, rows, seed, name, source)
    examples = [ex for ex in convert_rows(convert, rows, seed, name, source)
                if splits.is_heldout(spec.heldout, ex.extra["row_id"])]
    return examples if limit is None else examples[:limit]


def load_examples(cfg: EvalConfig) -> dict[str, list[EvalExample]]:
    """Every configured task's examples (first `limit` in source order), loaded before any model.
    A task without examples is an error naming it (an eval of nothing would report 0 of 0)."""
    check_task_names(cfg.tasks)
    out = {}
    for i, t in enumerate(cfg.tasks):
        out[t.name] = load_task(t.name, path=t.path, limit=t.limit, seed=cfg.seed, fields=t.fields,
                                branches=t.branches)
        if not out[t.name]:
            raise ValueError(f"tasks[{i}] ({t.name}): no examples in {t.path or 'its default source'}")
    return out


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
