"""What every example builder takes (`BuildSpec`) and returns (`BuildResult`), and its seeded choices.

Every random choice of a builder (K, which distractors, which worked examples, branch order) comes
from `example_rng(seed, what, item id)`, so an example does not depend on which other rows were
read: a `limit` keeps earlier examples unchanged, and a rerun builds the same examples.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Iterable, Sequence

from psynth_jax.data.examples import SynthesisExample


@dataclasses.dataclass
class BuildResult:
    """Examples built, and how many rows (or items) were skipped, by reason."""

    examples: list[SynthesisExample]
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """How one source's rows become examples.

    label: the source's name inside example ids. k: K values the builder may draw from (empty: the
    builder's own default). k_min / k_max: the K range every example must fall in (data.min_branches /
    data.max_branches). variant: the builder variant (None: its first).
    """

    label: str
    seed: int
    k: tuple[int, ...]
    k_min: int = 1
    k_max: int = 8
    variant: str | None = None

    def k_choices(self, default: Iterable[int]) -> list[int]:
        """The configured K values, else `default`, restricted to [k_min, k_max]."""
        values = self.k or tuple(default)
        return [k for k in values if self.k_min <= k <= self.k_max]

    def rng(self, what: str, item_id: str) -> random.Random:
        return example_rng(self.seed, what, item_id)


def example_rng(seed: int, what: str, item_id: str) -> random.Random:
    """The deterministic random stream of one (seed, builder step, item)."""
    return random.Random(f"{seed}:{what}:{item_id}")


def draw_k(spec: BuildSpec, item_id: str, allowed: Sequence[int]) -> int | None:
    """One K for an item among `allowed` (seeded by the item id); None when there is none."""
    return spec.rng("k", item_id).choice(list(allowed)) if allowed else None
