"""Split a text into K contiguous, non-empty, roughly equal chunks at natural boundaries.

Cuts are made at whitespace only: line breaks first, then sentence ends, then any
space, so that joining the chunks with whitespace gives the text back (up to
the whitespace at the cuts). Used for step-split exposure branches and split evidence.
"""

from __future__ import annotations

import re
from typing import Iterable

_SPACE_RE = re.compile(r"\s+")
_SENTENCE_END_RE = re.compile(r"[.!?][\"')\]$]*$")
_SENTENCE_START_RE = re.compile(r"[A-Z\"'(\[$]")


def _line_cuts(text: str) -> set[int]:
    return {m.start() for m in _SPACE_RE.finditer(text) if "\n" in m.group()}


def _sentence_cuts(text: str) -> set[int]:
    """Whitespace after ".", "!" or "?" (and closing quotes, brackets, "$") and before what can
    start a sentence (a capital, an opening quote or bracket, "$"): robust to money amounts
    ("$5. She") and to math, whose periods are rarely followed by a capital."""
    return {
        m.start() for m in _SPACE_RE.finditer(text)
        if _SENTENCE_END_RE.search(text, max(0, m.start() - 8), m.start())
        and _SENTENCE_START_RE.match(text, m.end())
    }


def _space_cuts(text: str) -> set[int]:
    return {m.start() for m in _SPACE_RE.finditer(text)}


def _balanced(candidates: list[int], k: int, length: int) -> list[int]:
    """k-1 increasing cut positions from `candidates`, each nearest to i*length/k while leaving
    enough candidates for the cuts after it."""
    chosen: list[int] = []
    lo = 0
    for i in range(1, k):
        hi = len(candidates) - (k - 1 - i)  # exclusive: keep k-1-i candidates for later cuts
        target = i * length / k
        j = min(range(lo, hi), key=lambda j: abs(candidates[j] - target))
        chosen.append(candidates[j])
        lo = j + 1
    return chosen


def _refine(text: str, cuts: list[int], k: int) -> list[int] | None:
    """Add cuts until there are k-1: split the longest splittable piece at its sentence end
    (else space) nearest its middle. None when the text has too few words."""
    finer = (sorted(_sentence_cuts(text)), sorted(_space_cuts(text)))
    cuts = sorted(cuts)
    while len(cuts) < k - 1:
        bounds = [0, *cuts, len(text)]
        pieces = sorted(zip(bounds[:-1], bounds[1:]), key=lambda ab: ab[0] - ab[1])  # longest first
        for a, b in pieces:
            inside = _first_nonempty([c for c in level if a < c < b] for level in finer)
            if inside:
                cuts = sorted([*cuts, min(inside, key=lambda c: abs(c - (a + b) / 2))])
                break
        else:
            return None
    return cuts


def _first_nonempty(lists: Iterable[list[int]]) -> list[int]:
    return next((xs for xs in lists if xs), [])


def split_contiguous(text: str, k: int) -> list[str] | None:
    """K contiguous non-empty chunks of `text`, or None when it has fewer than K words.

    With at least K lines, lines are grouped into K chunks of balanced length; otherwise every
    line is a cut and the longest pieces are split further at sentence ends, then spaces.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    text = text.strip()
    if not text:
        return None
    lines = sorted(_line_cuts(text))
    cuts = _balanced(lines, k, len(text)) if len(lines) >= k - 1 else _refine(text, lines, k)
    if cuts is None:
        return None
    bounds = [0, *cuts, len(text)]
    return [text[a:b].strip() for a, b in zip(bounds[:-1], bounds[1:])]


def normalize_space(text: str) -> str:
    """Whitespace runs collapsed to one space (how chunks are compared with their source)."""
    return _SPACE_RE.sub(" ", text).strip()


def split_last_sentence(text: str) -> tuple[str, str]:
    """(everything before the last sentence, the last sentence); ("", text) for one sentence."""
    text = text.strip()
    cuts = _sentence_cuts(text)
    if not cuts:
        return "", text
    last = max(cuts)
    return text[:last].strip(), text[last:].strip()
