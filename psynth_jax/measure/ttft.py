"""Time to first token of a synthesis path, measured around `ParallelSynthesis`'s steps.

TTFT is measured the same way for every path: from the start of the path's first device work to
the first sampled token being ready, compilation excluded (`time_calls` runs each timed call once
to compile first), the median of `repeats` calls. Worker generation is excluded, as in the
paper. The cache path's parts are timed too: its preparation (re-encode + map + assemble, or the
view's scalars) alone, and the preparation plus the prompt's prefill.
"""

from __future__ import annotations

import dataclasses

from psynth_jax.measure.timing import time_calls
from psynth_jax.synthesis.pipeline import PathSteps


@dataclasses.dataclass(frozen=True)
class TTFT:
    """A path's time to first token and its parts, seconds (medians of the timed calls)."""

    total_s: float
    breakdown: dict[str, float]  # cache path: prepare_s, prefill_s (preparation included); else prefill_s


def time_to_first_token(steps: PathSteps, repeats: int) -> TTFT:
    """Median seconds of `repeats` calls of the path up to its first token (after a compile call)."""

    def median(fn) -> float:
        return time_calls(fn, repeats).median_s

    def first_token():
        logits, _ = steps.prefill(steps.prepare())
        return steps.first_token(logits)

    with steps.mesh():
        if steps.name == "cache":
            breakdown = {"prepare_s": median(steps.prepare),
                         "prefill_s": median(lambda: steps.prefill(steps.prepare())[0])}
            return TTFT(median(first_token), breakdown)
        total = median(first_token)
        return TTFT(total, {"prefill_s": total})
