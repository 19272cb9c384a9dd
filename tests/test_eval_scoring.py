"""Scorers: gold answers score 100% on the shipped data, shuffled answers score at chance."""

from __future__ import annotations

import random

import pytest

from psynth_jax.formats import records
from psynth_jax.eval.example import EvalExample
from psynth_jax.eval.scoring import extract_answer, free_form_equal, math_equal, score, score_many
from psynth_jax.eval.tasks import load_task


@pytest.fixture(scope="module", autouse=True)
def _shipped_data():
    try:
        records.data_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def derangement(n: int, seed: int = 0) -> list[int]:
    """A random permutation with no fixed point (Sattolo's algorithm: one n-cycle)."""
    rng, perm = random.Random(seed), list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    assert all(i != p for i, p in enumerate(perm))
    return perm


def boxed(answer: str) -> str:
    return f"Reasoning... so the final answer is \\boxed{{{answer}}}."


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


# ---------------------------------------------------------------- math


def test_gsm8k_gold_boxed_scores_100_percent():
    examples = load_task("gsm8k")
    assert rate([score(e, boxed(e.gold)) for e in examples]) == 1.0


def test_gsm8k_reference_solutions_score_via_hashes():
    examples = load_task("gsm8k")
    assert rate([score(e, e.extra["solution"]) for e in examples]) == 1.0


def test_gsm8k_shuffled_golds_score_only_on_coincidence():
    examples = load_task("gsm8k")
    perm = derangement(len(examples))
    flags = [score(e, boxed(examples[j].gold)) for e, j in zip(examples, perm)]
    # Exactly the pairs whose two problems share the same numeric answer (1.6% here).
    assert flags == [float(e.gold) == float(examples[j].gold) for e, j in zip(examples, perm)]
    assert rate(flags) < 0.05


def test_math500_reference_solutions_score_at_least_99_percent():
    examples = load_task("math500")
    flags = [score(e, e.extra["solution"]) for e in examples]
    misses = [(e.id, e.gold) for e, ok in zip(examples, flags) if not ok]
    assert rate(flags) >= 0.99, misses  # 500/500 with math-verify 0.9.0


def test_math500_shuffled_golds_near_zero():
    examples = load_task("math500")
    perm = derangement(len(examples))
    assert rate([score(e, boxed(examples[j].gold)) for e, j in zip(examples, perm)]) < 0.05  # 1.4%: equal answers


@pytest.mark.parametrize(
    "gold,completion,expected",
    [
        ("0.5", "\\boxed{\\frac{1}{2}}", True),
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\dfrac{\\sqrt3}{2}}", True),
        ("1000", "The total is $1,000.\n#### 1,000", True),
        ("18", "She makes 9 * 2 = 18 dollars a day.", True),  # last number
        ("18", "\\boxed{18 \\text{ dollars}}", True),
        ("(3, \\frac{\\pi}{2})", "\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", True),
        ("5", "<think>maybe \\boxed{5}</think> Actually \\boxed{6}", False),  # the answer after thinking
        ("5", "I cannot solve this.", False),
        ("5", "", False),
        ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", True),
    ],
)
def test_math_equivalence(gold, completion, expected):
    ex = EvalExample("t/0", "gsm8k", "math", "q", gold)
    assert score(ex, completion) is expected


def test_math_equal_is_symbolic_not_textual():
    assert math_equal("x^2+2x+1", "(x+1)^2")
    assert not math_equal("x^2+1", "(x+1)^2")


# ---------------------------------------------------------------- multiple choice


def test_arc_gold_letters_score_100_percent_in_several_formats():
    examples = load_task("arc_challenge")
    for fmt in ("\\boxed{{{}}}", "The answer is ({}).", "Answer: {}", "\\boxed{{\\text{{{}}}}}"):
        assert rate([score(e, fmt.format(e.gold)) for e in examples]) == 1.0, fmt


def test_arc_shuffled_golds_score_at_chance():
    examples = load_task("arc_challenge")
    perm = derangement(len(examples))
    flags = [score(e, boxed(examples[j].gold)) for e, j in zip(examples, perm)]
    # Letters coincide about a quarter of the time (4 options), never more than that by design.
    assert flags == [e.gold == examples[j].gold for e, j in zip(examples, perm)]
    assert 0.15 < rate(flags) < 0.35


@pytest.mark.parametrize(
    "completion,letter",
    [("\\boxed{(c)}", "C"), ("The answer is **B**", "B"), ("So the answer is (d).", "D"),
     ("I considered A and C; C is correct.", "C"), ("\\boxed{E}", ""), ("No idea.", "")],
)
def test_letter_extraction(completion, letter):
    ex = EvalExample("t/0", "medqa", "multiple_choice", "q", "C", {"labels": ["A", "B", "C", "D"]})
    assert extract_answer(ex, completion) == letter
    assert score(ex, completion) is (letter == "C")


def test_boxed_option_text_counts_as_its_letter():
    ex = EvalExample("t/0", "gpqa_diamond", "multiple_choice", "q", "B",
                     {"labels": ["A", "B", "C", "D"], "choices": ["10 m", "Ampicillin", "x", "y"]})
    assert score(ex, "\\boxed{ampicillin}") and not score(ex, "\\boxed{10 m}")


# ---------------------------------------------------------------- MARBLE diagnosis


def test_marble_gold_labels_score_100_percent():
    examples = load_task("marble_db")
    assert rate([score(e, boxed(e.gold)) for e in examples]) == 1.0
    assert rate([score(e, f"The root causes are {e.gold}.") for e in examples]) == 1.0  # no box: mentions


def test_marble_shuffled_golds_score_only_when_gold_is_covered():
    examples = load_task("marble_db")
    perm = derangement(len(examples))
    flags = [score(e, boxed(examples[j].gold)) for e, j in zip(examples, perm)]
    covered = [set(e.extra["root_causes"]) <= set(examples[j].extra["root_causes"]) for e, j in zip(examples, perm)]
    assert flags == covered
    assert rate(flags) < 0.5


def test_marble_counts_only_the_allowed_number_of_labels():
    ex = next(e for e in load_task("marble_db") if e.extra["max_labels"] == 2)
    (gold,) = ex.extra["root_causes"]
    others = [label for label in ex.extra["labels"] if label != gold]
    assert score(ex, f"\\boxed{{{others[0]}, {gold.lower().replace('_', ' ')}}}")
    assert not score(ex, f"\\boxed{{{', '.join(others + [gold])}}}")  # all five named: first two count
    assert extract_answer(ex, f"\\boxed{{{gold}, {others[1]}, {others[0]}}}") == ", ".join(sorted([gold, others[1]]))


# ---------------------------------------------------------------- code


def test_humaneval_canonical_solutions_all_pass():
    examples = load_task("humaneval")
    flags = score_many(examples, [e.gold for e in examples], workers=2)
    assert [e.id for e, ok in zip(examples, flags) if not ok] == []


def test_humaneval_full_function_completions_pass():
    examples = load_task("humaneval")[::8]
    completions = [f"Here it is:\n```python\n{e.extra['prompt']}{e.gold}```\nDone." for e in examples]
    assert all(score_many(examples, completions, workers=2))


def test_humaneval_shuffled_solutions_fail():
    examples = load_task("humaneval")[:60]
    perm = derangement(len(examples))
    flags = score_many(examples, [examples[j].gold for j in perm], workers=2, timeout_s=3.0)
    assert rate(flags) < 0.05


def test_mbpp_reference_code_passes():
    examples = load_task("mbpp")[::2]  # a fixed half (214) keeps the suite fast; all 427 pass too
    flags = score_many(examples, [f"```python\n{e.gold}\n```" for e in examples], workers=2)
    assert [e.id for e, ok in zip(examples, flags) if not ok] == []


def test_mbpp_shuffled_code_fails():
    examples = load_task("mbpp")[:60]
    perm = derangement(len(examples))
    assert rate(score_many(examples, [examples[j].gold for j in perm], workers=2, timeout_s=3.0)) < 0.05


def test_code_score_single_and_extraction():
    ex = load_task("humaneval", limit=1)[0]
    assert score(ex, ex.gold) and not score(ex, "    return True\n")
    assert extract_answer(ex, "text\n```python\nx = 1\n```\n") == "x = 1\n"


# ---------------------------------------------------------------- open answers (GAIA)


@pytest.mark.parametrize(
    "gold,answer,expected",
    [("Paris", "paris.", True), ("1000", "1,000", True), ("3.50", "3.5", True), ("Paris", "Lyon", False),
     ("egalitarian", "", False)],
)
def test_free_form_match(gold, answer, expected):
    assert free_form_equal(gold, answer) is expected
