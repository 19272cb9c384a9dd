"""The report's statistics against independent computations: the Wilson interval's closed form at
known points, the exact McNemar test against a brute-force enumeration of fair-coin outcomes, and
the paired counts on hand-built records (errors count as wrong)."""

from __future__ import annotations

import itertools

import pytest

from psynth_jax.eval.stats import mcnemar_exact, summarize, wilson_interval
from psynth_jax.eval.store import ModeRecord


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = wilson_interval(5, 10)  # symmetric around 0.5
    assert lo == pytest.approx(0.23659, abs=1e-5) and hi == pytest.approx(1 - lo)
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize("wins,losses", [(0, 0), (0, 6), (1, 7), (3, 3), (9, 2), (12, 4)])
def test_mcnemar_exact_equals_enumerating_fair_coins(wins, losses):
    """p = P(a fair-coin split of the discordant pairs is at least as lopsided as observed)."""
    n = wins + losses
    observed = abs(wins - losses)
    extreme = sum(abs(2 * sum(flips) - n) >= observed for flips in itertools.product((0, 1), repeat=n))
    assert mcnemar_exact(wins, losses) == pytest.approx(min(1.0, extreme / 2**n))


def _rec(task: str, i: int, mode: str, correct: bool, error: str | None = None) -> ModeRecord:
    return ModeRecord(task=task, id=f"{task}/{i}", mode=mode, answer="x" if correct else "y", correct=correct,
                      text="", output_tokens=1, prompt_tokens=1, branch_tokens=0, num_branches=0, ttft_s=None,
                      breakdown={}, device="cpu", error=error)


def test_paired_counts_against_text():
    text = [True, True, False, False, True]
    mode = [True, False, True, True, False]
    records = [_rec("t", i, "text", c) for i, c in enumerate(text)]
    records += [_rec("t", i, "psynth", c, error="boom" if i == 4 else None) for i, c in enumerate(mode)]
    out = summarize(records, ["t"], ["text", "psynth"])
    v = out["tasks"]["t"]["psynth"]["vs_text"]
    assert (v["n"], v["wins"], v["losses"]) == (5, 2, 2)  # example 4: an error, counted wrong
    assert v["p_mcnemar"] == 1.0
    assert out["overall"]["text"]["vs_text"] == {"n": 5, "wins": 0, "losses": 0, "p_mcnemar": 1.0}


@pytest.mark.parametrize("correct,n", [(0, 12), (12, 12), (0, 1), (1, 3), (7, 9)])
def test_wilson_interval_holds_the_observed_share(correct, n):
    """At 0 of 12 the closed form's lower end is 2.8e-17, not 0, in floating point; the interval
    must still hold the accuracy (the report's error bars are accuracy - lower, upper - accuracy)."""
    lo, hi = wilson_interval(correct, n)
    assert 0.0 <= lo <= correct / n <= hi <= 1.0


def test_the_accuracy_plot_is_drawn_for_a_task_nobody_answered(tmp_path):
    from psynth_jax.eval.plots import accuracy_plot

    records = [_rec("gsm8k", i, m, False) for i in range(12) for m in ("text", "psynth")]
    results = {**summarize(records, ["gsm8k"], ["text", "psynth"]), "modes": ["text", "psynth"], "untrained": []}
    assert accuracy_plot(results, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 0
