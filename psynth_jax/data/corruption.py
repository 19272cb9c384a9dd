"""Deterministic corruption of a worked solution into a plausible wrong candidate.

A wrong candidate changes one number in the reasoning (an arithmetic slip) and replaces the
content of the final \\boxed{} with a wrong answer (one number of the gold answer changed), so
it reads like a real mistaken solution. All randomness comes from the caller's `random.Random`.
"""

from __future__ import annotations

import random
import re

from psynth_jax.formats.boxed import last_boxed_span

_INT_RE = re.compile(r"\d+")
_DELTAS = (1, 2, 3, 4, 5, 10)


def _perturb_int(digits: str, rng: random.Random) -> str:
    """A different non-negative integer near `digits`."""
    value = int(digits)
    delta = rng.choice(_DELTAS) * rng.choice((-1, 1))
    new = value + delta if value + delta >= 0 else value + abs(delta)
    return str(new)


def perturb_one_number(text: str, rng: random.Random) -> str | None:
    """`text` with one of its integer runs (chosen by rng) changed; None if it has no digits."""
    runs = list(_INT_RE.finditer(text))
    if not runs:
        return None
    m = rng.choice(runs)
    return text[: m.start()] + _perturb_int(m.group(), rng) + text[m.end() :]


def wrong_answers(answer: str, count: int, rng: random.Random, tries: int = 50) -> list[str] | None:
    """`count` distinct wrong answers made by changing one number of `answer`; None when the
    answer has no digits (nothing to perturb) or not enough distinct values were found."""
    found: list[str] = []
    for _ in range(tries):
        if len(found) == count:
            break
        wrong = perturb_one_number(answer, rng)
        if wrong is None:
            return None
        if wrong != answer and wrong not in found:
            found.append(wrong)
    return found if len(found) == count else None


def corrupt_solution(solution: str, wrong_answer: str, rng: random.Random) -> str:
    """The solution with one reasoning number changed and its last \\boxed{} set to wrong_answer."""
    span = last_boxed_span(solution)
    if span is None:
        raise ValueError("the solution has no \\boxed{} answer to corrupt")
    start, end = span
    reasoning = solution[: start]
    slipped = perturb_one_number(reasoning, rng)
    if slipped is not None:
        reasoning = slipped
    return reasoning + wrong_answer + solution[end:]
