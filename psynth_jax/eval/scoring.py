"""Is a completion right? `score(example, completion)`, dispatched on the example's family.

- math: the final answer (last \\boxed{}, else "#### N", else the last number) checked against
  the gold with math-verify (symbolic/numeric equivalence); plain string equality only when
  math-verify can parse neither side.
- multiple_choice: the chosen letter equals the gold letter.
- code: the program (last ```python block, else the whole text) runs with the task's tests in
  the sandbox (separate process, 10 s default as in the paper); passes iff it exits cleanly.
  `if __name__ == "__main__":` blocks do not run (as in the release, which exec'd solutions).
- diagnosis (MARBLE): the release's rule. Predicted labels are those in the last \\boxed{}, or,
  without a box, every candidate label mentioned (after any thinking), in order of first
  mention; only the first `number_of_labels_pred` of them count (2 for one-cause tasks, 3 for
  two-cause tasks); correct iff every gold root cause is among them.
- open (GAIA): the release's free-form exact match: case-insensitive, whitespace collapsed,
  surrounding punctuation stripped, numbers compared as numbers.
- qa (multi-hop QA, a user's short-answer file): the answer (extracted as for open) is right when
  it equals one of the accepted answers after the usual QA normalisation (lower case, punctuation
  and the articles a / an / the removed, whitespace collapsed): exact match. `f1` gives the token
  F1 against the best accepted answer; the report records both.
- tool (function calls): the calls parsed from the completion exactly match the gold calls
  (formats/tool_calls.py: same calls, any order, every argument acceptable).

`extract_answer` gives the string each rule compares, for agreement metrics between branches.
"""

from __future__ import annotations

import collections
import functools
import re
import threading
from typing import Sequence

from math_verify import parse, verify

from psynth_jax.eval import extract
from psynth_jax.eval.example import EvalExample
from psynth_jax.eval.sandbox import run_code, run_many
from psynth_jax.formats.tool_calls import calls_match, format_calls, parse_calls

_MATH_TIMEOUT_S = 5
_DEF_RE = "^[ \t]*(?:async[ \t]+)?def[ \t]+{name}[ \t]*\\("


def _math_timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which works only on the main thread."""
    return _MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_boxed(answer: str) -> tuple:
    return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=_math_timeout()))


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.").lower()


def math_equal(gold: str, answer: str) -> bool:
    """Whether `answer` (extracted text) is mathematically equal to `gold` (math-verify)."""
    if not answer.strip():
        return False
    g, p = _parse_boxed(gold), _parse_boxed(answer)
    if g and p:
        return bool(verify(list(g), list(p), timeout_seconds=_math_timeout()))
    return _squash(gold) == _squash(answer)


def _free_form_norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower()).strip(" \"'`.,;:!?()[]{}")


def free_form_equal(gold: str, answer: str) -> bool:
    """The release's GAIA match: normalized strings equal, or both numbers (commas dropped) equal."""
    g, p = _free_form_norm(gold), _free_form_norm(answer)
    if not g or not p:
        return False
    if g == p:
        return True
    try:
        return abs(float(g.replace(",", "")) - float(p.replace(",", ""))) <= 1e-9
    except ValueError:
        return False


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION_RE = re.compile(r"[^\w\s]")


def normalize_qa(s: str) -> str:
    """QA answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES_RE.sub(" ", _PUNCTUATION_RE.sub(" ", s.lower())).split())


def qa_exact_match(answer: str, accepted: Sequence[str]) -> bool:
    """Whether the normalised answer equals one of the normalised accepted answers."""
    a = normalize_qa(answer)
    return bool(a) and any(a == normalize_qa(g) for g in accepted)


def qa_f1(answer: str, accepted: Sequence[str]) -> float:
    """Token F1 of the normalised answer against the best of the accepted answers (0 for none)."""
    predicted = normalize_qa(answer).split()
    best = 0.0
    for gold in accepted:
        truth = normalize_qa(gold).split()
        common = sum((collections.Counter(predicted) & collections.Counter(truth)).values())
        if common:
            precision, recall = common / len(predicted), common / len(truth)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def f1(example: EvalExample, answer: str) -> float:
    """Token F1 of an extracted answer (a record's `answer`) for a qa-family example."""
    return qa_f1(answer, example.extra["answers"])


def chosen_letter(example: EvalExample, completion: str) -> str:
    """The option letter a multiple-choice completion picks ("" if none)."""
    return extract.choice_letter(completion, example.extra["labels"], example.extra.get("choices", ()))


def predicted_labels(example: EvalExample, completion: str) -> list[str]:
    """MARBLE labels that count: the first `max_labels` the completion names."""
    labels = extract.predicted_labels(completion, example.extra["labels"])
    return labels[: example.extra["max_labels"]]


def build_program(example: EvalExample, completion: str) -> str:
    """The program that decides a code example: solution plus tests.

    HumanEval(+): the prompt, then the completion (a function body continues the prompt; a
    completion that defines the entry point itself redefines it, with the prompt's imports and
    helper functions still in scope), then the test code and `check(entry_point)`.
    MBPP(+): setup imports, the completion, the asserts (MBPP+: its extended test code).
    """
    code = extract.code_block(completion)
    x = example.extra
    if x["harness"] == "humaneval":
        entry = x["entry_point"]
        defines = re.search(_DEF_RE.format(name=re.escape(entry)), code, flags=re.MULTILINE) is not None
        program = f"{x['prompt']}\n\n{code}" if defines else x["prompt"] + code
        return f"{program}\n\n{x['test']}\n\ncheck({entry})\n"
    return f"{x['setup']}\n\n{code}\n\n{x['tests']}\n"


def extract_answer(example: EvalExample, completion: str) -> str:
    """The answer string a completion gives, in the form its scorer compares."""
    family = example.family
    if family == "math":
        return extract.math_answer(completion)
    if family == "multiple_choice":
        return chosen_letter(example, completion)
    if family == "code":
        return extract.code_block(completion)
    if family == "diagnosis":
        return ", ".join(sorted(predicted_labels(example, completion)))
    if family == "tool":
        calls = parse_calls(completion)
        return format_calls(calls) if calls else ""
    return extract.free_form_answer(completion)


def _score_text(example: EvalExample, completion: str) -> bool:
    """Every family except code (no execution needed)."""
    if example.family == "diagnosis":
        predicted = set(predicted_labels(example, completion))
        gold = example.extra["root_causes"]
        return bool(gold) and all(label in predicted for label in gold)
    if example.family == "tool":
        return calls_match(parse_calls(completion), example.extra["gold_calls"])
    answer = extract_answer(example, completion)
    if example.family == "math":
        return math_equal(example.gold, answer)
    if example.family == "multiple_choice":
        return answer == example.gold
    if example.family == "qa":
        return qa_exact_match(answer, example.extra["answers"])
    return free_form_equal(example.gold, answer)


def score(example: EvalExample, completion: str, timeout_s: float = 10.0, memory_mb: int = 512) -> bool:
    """True when `completion` answers `example` correctly (rules in the module docstring)."""
    if example.family == "code":
        return run_code(build_program(example, completion), timeout_s, memory_mb, as_main=False).passed
    return _score_text(example, completion)


def score_many(
    examples: Sequence[EvalExample],
    completions: Sequence[str],
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
) -> list[bool]:
    """`score` over pairs, running the code examples `workers` programs at a time."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    out = [False] * len(examples)
    code_idx = [i for i, ex in enumerate(examples) if ex.family == "code"]
    programs = [build_program(examples[i], completions[i]) for i in code_idx]
    for i, result in zip(code_idx, run_many(programs, workers, timeout_s, memory_mb, as_main=False)):
        out[i] = result.passed
    for i, ex in enumerate(examples):
        if ex.family != "code":
            out[i] = _score_text(ex, completions[i])
    return out
