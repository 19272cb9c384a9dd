"""Per-dataset, per-mode metrics from mode records: accuracy with a Wilson 95% interval, TTFT
median / p90, speedup over text synthesis, agreement with text synthesis, the paired comparison
with text synthesis (exact McNemar test), token counts.

Pure Python over `ModeRecord`s, so the numbers can be recomputed from records.jsonl alone.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

from psynth_jax.eval.store import ModeRecord

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (well behaved at 0, n and small n); None for n = 0."""
    if n == 0:
        return None
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval holds p exactly; rounding alone (2.8e-17 above 0 at 0 of 12) must not say otherwise
    return min(p, max(0.0, center - half)), max(p, min(1.0, center + half))


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `wins` vs `losses` discordant pairs
    (examples only one of two modes answered correctly) against a fair coin."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _mean(values: Iterable[float]) -> float | None:
    v = list(values)
    return statistics.fmean(v) if v else None


def mode_metrics(records: Sequence[ModeRecord], text: dict[tuple[str, str], ModeRecord]) -> dict[str, Any]:
    """Metrics of one mode's records; `text` maps (task, id) to the text path's record of that example."""
    n = len(records)
    correct = sum(r.correct for r in records)
    ttfts = [r.ttft_s * 1e3 for r in records if r.ttft_s is not None]
    same = [(r, text[(r.task, r.id)]) for r in records if (r.task, r.id) in text]
    paired = [(r, t) for r, t in same if r.error is None and t.error is None]
    wins = sum(r.correct and not t.correct for r, t in same)  # errors count as wrong, as in accuracy
    losses = sum(t.correct and not r.correct for r, t in same)
    ci = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "ci95": list(ci) if ci else None,
        "errors": sum(r.error is not None for r in records),
        "ttft_ms": {
            "n": len(ttfts),
            "median": statistics.median(ttfts) if ttfts else None,
            "p90": percentile(ttfts, 90) if ttfts else None,
        },
        "agreement_with_text": (sum(r.answer == t.answer for r, t in paired) / len(paired)) if paired else None,
        "agreement_n": len(paired),
        "vs_text": {"n": len(same), "wins": wins, "losses": losses, "p_mcnemar": mcnemar_exact(wins, losses)},
        "branch_tokens_mean": _mean(r.branch_tokens for r in records if r.error is None),
        "prompt_tokens_mean": _mean(r.prompt_tokens for r in records if r.error is None),
        "output_tokens_mean": _mean(r.output_tokens for r in records if r.error is None),
    }


def add_speedups(by_mode: dict[str, dict[str, Any]]) -> None:
    """speedup_vs_text = median TTFT of text / median TTFT of the mode (in place; None when unknown)."""
    text = by_mode.get("text", {}).get("ttft_ms", {}).get("median")
    for m in by_mode.values():
        own = m["ttft_ms"]["median"]
        m["speedup_vs_text"] = text / own if text and own else None


def summarize(records: Sequence[ModeRecord], tasks: Sequence[str], modes: Sequence[str]) -> dict[str, Any]:
    """{"tasks": {task: {mode: metrics}}, "overall": {mode: metrics}} over the given records.

    Overall pools every task's records (micro-average; TTFT percentiles over all requests).
    """
    text = {(r.task, r.id): r for r in records if r.mode == "text"}
    out: dict[str, Any] = {"tasks": {}, "overall": {}}
    for task in tasks:
        by_mode = {m: mode_metrics([r for r in records if r.task == task and r.mode == m], text) for m in modes}
        add_speedups(by_mode)
        out["tasks"][task] = by_mode
    overall = {m: mode_metrics([r for r in records if r.mode == m], text) for m in modes}
    add_speedups(overall)
    out["overall"] = overall
    return out
