"""Pull the final answer out of a model completion: boxed content, letters, code, labels.

Pure string functions (no task knowledge), shared by the scorers. Every extractor first drops a
reasoning preamble: text up to the last "</think>" (Qwen3-style thinking) is not the answer.
"""

from __future__ import annotations

import re
from typing import Sequence

from psynth_jax.formats.boxed import last_boxed

_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_NUMBER_RE = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?|-?\.\d+")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\s*\{(.*)\}$", re.DOTALL)
_FENCE_RE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
# "answer is (b)", "Answer: B", "answer is **C**": a lower-case letter only inside brackets.
_ANSWER_IS_RE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:(?i:option)\s*)?\**\s*"
    r"(?:[\(\[]\s*([A-Za-z])\s*[\)\]]|([A-Z])(?![A-Za-z0-9]))"
)
_PYTHON_TAGS = {"python", "py", "python3"}


def after_thinking(text: str) -> str:
    """The text after the last "</think>" tag (the whole text when there is none)."""
    idx = text.rfind("</think>")
    return text if idx < 0 else text[idx + len("</think>") :]


def _strip_number_commas(s: str) -> str:
    return s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s


def math_answer(completion: str) -> str:
    """Final answer of a math completion: last \\boxed{}, else the last "#### N", else the last
    number in the text; "" when there is none. Thousands separators in plain numbers are removed."""
    text = after_thinking(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        return _strip_number_commas(boxed)
    hashes = _HASHES_RE.findall(text)
    if hashes:
        tail = hashes[-1].strip().strip("$").rstrip(".").strip()
        return _strip_number_commas(tail)
    numbers = _NUMBER_RE.findall(text)
    return _strip_number_commas(numbers[-1]) if numbers else ""


def _unwrap_text(s: str) -> str:
    s = s.strip().strip("$").strip()
    while (m := _TEXT_WRAP_RE.match(s)) is not None:
        s = m.group(1).strip()
    return s


def choice_letter(completion: str, letters: Sequence[str], choices: Sequence[str] = ()) -> str:
    """The chosen option letter (one of `letters`), or "" when none can be found.

    Order of evidence: the last \\boxed{} holding a valid letter ("B", "(b)", "\\text{B}"), an
    option's text (`choices`, same order as `letters`, case-insensitive), or a lettered option
    ("B. text"); then the last "answer is (X)" / "Answer: X"; then the last
    standalone capital letter among `letters`. Lower case is accepted only in the first two forms
    (a bare "a" is usually an article).
    """
    valid = {c.upper() for c in letters}
    text = after_thinking(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        content = _unwrap_text(boxed)
        bare = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?", content)
        by_text = {str(c).strip().lower(): letter.upper() for letter, c in zip(letters, choices)}
        prefix = re.match(r"^[\(\[]?\s*([A-Za-z])(?![A-Za-z])", content)
        if bare and bare.group(1).upper() in valid:  # a letter wins over an option whose text is "C"
            return bare.group(1).upper()
        if content.lower() in by_text:
            return by_text[content.lower()]
        if prefix and prefix.group(1).upper() in valid:
            return prefix.group(1).upper()
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter
    standalone = [c for c in re.findall(r"(?<![A-Za-z0-9_])([A-Z])(?![A-Za-z0-9_])", text) if c in valid]
    return standalone[-1] if standalone else ""


def code_block(completion: str) -> str:
    """The program in a completion: the last ```python (or py/python3) block, else the last
    fenced block of any language, else the whole text (only trailing space trimmed, so an indented
    function body such as a HumanEval completion keeps its indentation)."""
    text = after_thinking(completion)
    blocks = _FENCE_RE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in _PYTHON_TAGS]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text.rstrip()


def _label_pattern(label: str) -> re.Pattern[str]:
    """Case-insensitive label match; "_" also matches a space, hyphen or LaTeX "\\_"."""
    parts = [re.escape(p) for p in label.split("_")]
    return re.compile(r"(?<![A-Za-z0-9_])" + r"(?:\\?_|[\s-])".join(parts) + r"(?![A-Za-z0-9_])", re.IGNORECASE)


def labels_in_order(text: str, labels: Sequence[str]) -> list[str]:
    """Candidate labels mentioned in `text`, ordered by first mention."""
    found = []
    for label in labels:
        m = _label_pattern(label).search(text)
        if m:
            found.append((m.start(), label))
    return [label for _, label in sorted(found)]


def predicted_labels(completion: str, labels: Sequence[str]) -> list[str]:
    """Root-cause labels a completion names: those inside the last \\boxed{} when there is one
    (comma separated in practice; any separator works), else every label mentioned after the
    thinking, in order of first mention (the release's fallback)."""
    text = after_thinking(completion)
    boxed = last_boxed(text)
    return labels_in_order(boxed if boxed is not None else text, labels)


def free_form_answer(completion: str) -> str:
    """Final answer of an open question (GAIA): the last <answer>...</answer>, else the last
    \\boxed{}, else what follows the last "FINAL ANSWER:" (GAIA's own format), else the last
    non-empty line."""
    text = after_thinking(completion)
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL | re.IGNORECASE)
    if tagged:
        return tagged[-1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return _unwrap_text(boxed)
    final = re.findall(r"final answer\s*:\s*([^\n]+)", text, flags=re.IGNORECASE)
    if final:
        return final[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
