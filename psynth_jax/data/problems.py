"""Raw dataset rows -> `Problem`: a question, its worked solution and its gold answer.

Two schemas are understood, whatever file or hub dataset they come from:
- GSM8K: {"question", "answer"}, the answer being the worked steps then "#### N". The `<<a*b=c>>`
  calculator annotations are removed and the solution ends "The final answer is \\boxed{N}".
- MATH: {"problem", "solution"} (optionally "answer"); the gold answer is "answer" or else the
  last \\boxed{} of the solution, which is kept verbatim (it already boxes its answer).
Rows without a final answer are skipped (the caller counts them).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from psynth_jax.formats.boxed import last_boxed
from psynth_jax.formats.rows import text_value

_CALC_RE = re.compile(r"<<[^>]*>>")


@dataclasses.dataclass(frozen=True)
class Problem:
    """id: "<source label>/<row id>"; reasoning: the worked steps (before the final-answer
    sentence for GSM8K, the whole solution for MATH); solution: the full target text, whose last
    \\boxed{} holds `answer`."""

    id: str
    family: str
    question: str
    reasoning: str
    solution: str
    answer: str


def final_answer_sentence(answer: str) -> str:
    return f"The final answer is \\boxed{{{answer}}}"


def _gsm8k(row: dict[str, Any], pid: str) -> Problem | None:
    text = text_value(row["answer"], "answer", numbers=True)
    if "####" not in text:
        return None
    steps, _, tail = text.rpartition("####")
    answer = tail.strip().replace(",", "")
    reasoning = _CALC_RE.sub("", steps).strip()
    if not answer or not reasoning:
        return None
    solution = f"{reasoning}\n{final_answer_sentence(answer)}"
    return Problem(pid, "math", text_value(row["question"], "question").strip(), reasoning, solution, answer)


def _math(row: dict[str, Any], pid: str) -> Problem | None:
    solution = text_value(row["solution"], "solution").strip()
    boxed = last_boxed(solution)
    answer = text_value(row["answer"], "answer", numbers=True).strip() if row.get("answer") is not None else boxed
    if not answer or not solution:
        return None
    if boxed is None:  # a solution that states its answer without boxing it
        solution = f"{solution}\n{final_answer_sentence(answer)}"
    return Problem(pid, "math", text_value(row["problem"], "problem").strip(), solution, solution, answer)


def row_id(row: dict[str, Any], index: int) -> str:
    """The row's own id when it has one ("unique_id", "id"), else its position in the source."""
    for key in ("unique_id", "id"):
        if row.get(key) is not None:
            return str(row[key])
    return str(index)


def parse_problem(row: dict[str, Any], index: int, label: str) -> Problem | None:
    """A Problem from a GSM8K- or MATH-schema row; None when the row has no final answer.

    Raises ValueError for a row in neither schema, naming the fields it has.
    """
    pid = f"{label}/{row_id(row, index)}"
    if row.get("question") is not None and row.get("answer") is not None:
        return _gsm8k(row, pid)
    if row.get("problem") is not None and row.get("solution") is not None:
        return _math(row, pid)
    raise ValueError(
        "the row is in neither the GSM8K schema (question, answer) nor the MATH schema (problem, solution); "
        f"it has fields {sorted(k for k in row if not k.startswith('_'))}"
    )
