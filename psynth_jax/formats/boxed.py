"""The `\\boxed{...}` answer convention shared by prompts, training data and scoring.

Worker and synthesizer prompts ask for the final answer in `\\boxed{}`; the data builders find a
gold solution's answer (and where to corrupt it) there, and the scorers read a completion's
answer from it. One parser serves all of them.
"""

from __future__ import annotations

import re

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE_RE = re.compile(r"\\boxed\s+([^\s$]+)")


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last `\\boxed{...}` / `\\fbox{...}` whose braces
    balance, or None."""
    for m in reversed(list(_BOXED_RE.finditer(text))):
        depth = 1
        for i in range(m.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return m.end(), i
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces), else of `\\boxed x`."""
    span = last_boxed_span(text)
    if span is not None:
        return text[span[0] : span[1]].strip()
    bare = _BOXED_BARE_RE.findall(text)
    return bare[-1].strip() if bare else None
