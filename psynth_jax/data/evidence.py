"""Aggregation over evidence: context paragraphs as branches (METHOD.md section 5, role b).

A multi-hop question (2WikiMultihopQA, HotpotQA, MuSiQue; formats/multihop.py) becomes one
example: K paragraphs, every supporting one plus distractors, shuffled, each one branch (what a
retrieval agent found: "title\\ntext"); the question is the synthesizer's question; the target
is the answer in one of two forms (the source's variant):
- short: "\\boxed{answer}";
- reasoned: the supporting passages' titles and the facts that link them, then the boxed
  answer (the release's 2Wiki target names the supporting contexts before the boxed answer too).
K is drawn per question (seeded by its id) from the source's `k` values, else from every value
between its supporting count and data.max_branches. Rows held out for evaluation
(formats/splits.py) are never used here; they are counted under "held out for evaluation".
"""

from __future__ import annotations

from typing import Any, Sequence

from psynth_jax.data.build import BuildResult, BuildSpec, draw_k
from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.formats import splits
from psynth_jax.formats.multihop import MultihopQuestion, Paragraph, choose_paragraphs, parse_multihop
from psynth_jax.formats.rows import RowError
from psynth_jax.synthesis import prompts

VARIANTS = ("short", "reasoned")
HELDOUT = "held out for evaluation"


def target_text(q: MultihopQuestion, variant: str) -> str:
    """The synthesizer's target for `q` in form `variant` (module docstring)."""
    boxed = f"\\boxed{{{q.answer}}}"
    if variant == "short":
        return boxed
    titles = "; ".join(p.title for p in q.supporting if p.title)
    facts = "\n".join(q.evidence)
    parts = [f"Supporting passages: {titles}." if titles else "", facts, f"So the answer is {boxed}."]
    return "\n".join(p for p in parts if p)


def evidence_example(q: MultihopQuestion, paragraphs: Sequence[Paragraph], variant: str, label: str
                     ) -> SynthesisExample:
    k = len(paragraphs)
    branches = tuple(Branch(prompts.branch_prompt("paragraph", q.question, i, k), p.render())
                     for i, p in enumerate(paragraphs))
    meta = {"builder": "aggregation", "kind": "evidence paragraphs", "variant": variant, "dataset": q.dataset,
            "answer": q.answer, "answers": list(q.answers), "supporting": [p.supporting for p in paragraphs]}
    return SynthesisExample(f"evidence-{variant}/{label}/{q.id}", "qa", q.question, branches,
                            target_text(q, variant), meta)


def build_evidence(rows: Sequence[dict[str, Any]], spec: BuildSpec) -> BuildResult:
    """Evidence-aggregation examples of every usable, not held-out multi-hop row."""
    variant = spec.variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"multi-hop aggregation has variants {VARIANTS}, not {variant!r}")
    result = BuildResult([])
    for i, row in enumerate(rows):
        try:
            q = parse_multihop(row, i)
        except RowError as err:
            result.skipped[err.reason] += 1
            continue
        if splits.is_heldout(splits.MULTIHOP, q.id):
            result.skipped[HELDOUT] += 1
            continue
        n_support = len(q.supporting)
        default = range(max(n_support, spec.k_min), spec.k_max + 1)
        k = draw_k(spec, q.id, [k for k in spec.k_choices(default) if n_support <= k <= len(q.paragraphs)])
        if k is None:
            result.skipped["supporting paragraphs outside the K range"] += 1
            continue
        paragraphs = choose_paragraphs(q, k, spec.rng("paragraphs", q.id))
        result.examples.append(evidence_example(q, paragraphs, variant, spec.label))
    return result
