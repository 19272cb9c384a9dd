"""Exposure from worked examples: in-context examples as branches (METHOD.md section 5, role a).

Rows of one task (a FLAN CoT file, a P3 prompt template, a FLAN task name) are worked examples
of the same kind. Each row in turn is the query: K other rows of its task, drawn with a seed
fixed by the query's id, are the branches (each one worked example, "Question: ...\\nAnswer: ..."),
the row's question is the synthesizer's question and its worked answer the target. The release
builds its FLAN data the same way (the exemplars of a few-shot prompt as contexts, the last
question as the query); rows here are grouped by task instead of cut out of few-shot prompts.

Row layouts:
- flan_cot: {"question", "answer", "rationale"} (FLAN's CoT TSV files: question, answer, rationale);
  the worked answer is "<rationale> So the answer is <answer>."
- p3: {"prompt", "completion"} (T0 / P3 template files; the trailing "<|endoftext|>" is dropped),
  or the P3 hub layout {"inputs_pretokenized", "targets_pretokenized"}.
- flan: {"inputs", "targets"} (the FLAN collection on the hub).
The task of a row is its file's name for local files (data/sources.py adds it as "_task"),
else a "task_name" / "_task_name" / "task" / "_task" field.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

from psynth_jax.data.build import BuildResult, BuildSpec, draw_k
from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.formats.rows import RowError, need, need_text, present
from psynth_jax.synthesis import prompts

TASK_FIELDS = ("_task", "task_name", "_task_name", "task", "_task_source")
_END_OF_TEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class WorkedExample:
    id: str
    task: str
    question: str
    answer: str  # the whole worked answer (rationale and final answer)


def is_flan_cot_row(row: dict[str, Any]) -> bool:
    return {"question", "answer", "rationale"} <= set(row)


def is_p3_row(row: dict[str, Any]) -> bool:
    return {"prompt", "completion"} <= set(row) or {"inputs_pretokenized", "targets_pretokenized"} <= set(row)


def is_flan_row(row: dict[str, Any]) -> bool:
    return {"inputs", "targets"} <= set(row)


def _task(row: dict[str, Any]) -> str:
    for key in TASK_FIELDS:
        if present(row.get(key)):
            return str(row[key])
    raise RowError("no task name", f"none of {list(TASK_FIELDS)} in a row with fields {sorted(row)}")


def worked_example(row: dict[str, Any], index: int, fmt: str) -> WorkedExample:
    """One row as a WorkedExample (RowError naming a missing field)."""
    task = _task(row)
    if fmt == "flan_cot":
        question, answer = need_text(row, "question").strip(), need_text(row, "answer", numbers=True).strip()
        rationale = str(row.get("rationale") or "").strip()
        worked = f"{rationale} So the answer is {answer}." if rationale else answer
    elif fmt == "p3":
        question = need_text(row, "prompt", "inputs_pretokenized").strip()
        worked = need_text(row, "completion", "targets_pretokenized").replace(_END_OF_TEXT, "").strip()
    else:
        question, worked = need_text(row, "inputs").strip(), need_text(row, "targets").strip()
    if not worked:
        raise RowError("no answer")
    return WorkedExample(f"{task}/{row.get('id', index)}", task, question, worked)


def demo_text(demo: WorkedExample) -> str:
    """One worked example as a branch's text."""
    return f"Question: {demo.question}\nAnswer: {demo.answer}"


def build_icl(rows: Sequence[dict[str, Any]], spec: BuildSpec, fmt: str, default_k: int) -> BuildResult:
    """One exposure example per row whose task has enough other rows to be its K worked examples."""
    result = BuildResult([])
    by_task: dict[str, list[WorkedExample]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        try:
            w = worked_example(row, i, fmt)
        except RowError as err:
            result.skipped[err.reason] += 1
            continue
        by_task[w.task].append(w)
    choices = spec.k_choices([default_k])
    for task, demos in by_task.items():
        for query in demos:
            k = draw_k(spec, query.id, [k for k in choices if k <= len(demos) - 1])
            if k is None:
                result.skipped["too few rows of its task"] += 1
                continue
            rng = spec.rng("icl", query.id)
            others = [d for d in demos if d is not query]
            picked = rng.sample(others, k)
            branches = tuple(Branch(prompts.branch_prompt("example", query.question, i, k), demo_text(d))
                             for i, d in enumerate(picked))
            meta = {"builder": "exposure", "kind": "worked examples", "task": task, "demos": [d.id for d in picked]}
            result.examples.append(SynthesisExample(f"icl/{spec.label}/{query.id}", "icl", query.question,
                                                    branches, query.answer, meta))
    return result
