"""The one record every evaluation task is turned into, whatever its source schema."""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Sequence

FAMILIES = ("math", "multiple_choice", "code", "diagnosis", "open", "qa", "tool")


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One evaluation problem.

    id: stable identifier ("gsm8k/12", "HumanEval/0", ...).
    task: registry name of the task it came from ("gsm8k", "medqa", ...).
    family: how it is answered and scored: "math", "multiple_choice", "code", "diagnosis",
        "open" (free-form short answers: GAIA), "qa" (short answers with accepted aliases: exact
        match and F1) or "tool" (function calls: exact call match).
    question: the full problem text shown to workers (options included for multiple choice);
        the answer-format instruction is added by the prompt templates, not here.
    gold: the reference: final answer, option letter, reference program, or the gold root
        causes joined by ", ".
    extra: task-specific data the scorer or the workflow needs: option letters, tests and entry
        point, expert profiles, candidate labels, worked solution, accepted answers, gold calls;
        "branches" (with "branch_role", a prompts.BRANCH_ROLES key): branch texts that are given
        (context paragraphs, function docs) instead of decoded by workers.
    """

    id: str
    task: str
    family: str
    question: str
    gold: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; known: {FAMILIES}")


def format_choices(stem: str, choices: Sequence[str]) -> tuple[str, list[str]]:
    """Question text with lettered options ("A. ...") and the letters used."""
    letters = list(string.ascii_uppercase[: len(choices)])
    lines = [f"{letter}. {str(text).strip()}" for letter, text in zip(letters, choices)]
    return f"{stem.strip()}\n\n" + "\n".join(lines), letters
