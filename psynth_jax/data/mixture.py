"""A stage's mixture: per-source caps and weights, applied to the examples each source built.

cap c: keep at most c examples of the source, a sample drawn with a seed fixed by (seed, source
name), in source order. weight w: each kept example appears floor(w) times per epoch, plus a
seeded sample of round((w - floor(w)) * n) of the n kept examples once more; so 1 keeps every
example once, 2 repeats each, 0.5 keeps a seeded half and 0 leaves the source out (it is not
even read). A source's
share of the stage is its count over the sum of every source's count; the data summary prints
both. Both steps depend only on (examples, config), so every process computes the same stage.
"""

from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def _sample_in_order(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    keep = sorted(rng.sample(range(len(items)), count))
    return [items[i] for i in keep]


def apply_cap(items: Sequence[T], cap: int | None, seed: int, name: str) -> list[T]:
    """At most `cap` of `items` (a seeded sample, in source order); all of them when cap is None."""
    if cap is None or len(items) <= cap:
        return list(items)
    return _sample_in_order(items, cap, random.Random(f"{seed}:cap:{name}"))


def weighted_count(n: int, weight: float) -> int:
    """How many examples `weight` makes of n kept ones."""
    whole = math.floor(weight)
    return whole * n + round((weight - whole) * n)


def apply_weight(items: Sequence[T], weight: float, seed: int, name: str) -> list[T]:
    """`items` repeated floor(weight) times plus a seeded sample of the fractional part."""
    whole = math.floor(weight)
    extra = weighted_count(len(items), weight) - whole * len(items)
    return list(items) * whole + _sample_in_order(items, extra, random.Random(f"{seed}:weight:{name}"))
