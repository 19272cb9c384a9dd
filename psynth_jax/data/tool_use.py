"""Aggregation over parallel tool use (METHOD.md section 5, role b), from BFCL-style problems.

Two variants (formats/tool_calls.py reads the rows and writes calls):
- schemas: each branch holds one function schema offered to the request (what an agent found
  about one tool: its JSON doc); the target is the set of calls the request needs,
  "[f(a=1), g(b='x')]". A problem offering more than data.max_branches functions keeps the ones
  its gold calls use plus distractors drawn by a seed; the branch order is drawn too.
- calls: each branch holds one of the request's parallel gold calls (what one tool agent
  did); the target is the combined answer, every call in one list. Only problems with at
  least data.min_branches calls qualify.
The BFCL files carry no execution results, so no branch holds a tool's output. Problems held out
for evaluation (formats/splits.py) are never used here ("held out for evaluation").
"""

from __future__ import annotations

from typing import Any, Sequence

from psynth_jax.data.build import BuildResult, BuildSpec
from psynth_jax.data.evidence import HELDOUT
from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.formats import splits
from psynth_jax.formats.rows import RowError
from psynth_jax.formats.tool_calls import (
    ToolProblem, canonical_call, canonical_calls, format_calls, function_doc, parse_problem,
)
from psynth_jax.synthesis import prompts

VARIANTS = ("schemas", "calls")


def offered_functions(p: ToolProblem, k_max: int, spec: BuildSpec) -> list[dict[str, Any]]:
    """At most k_max of the problem's functions (all the gold calls use first), in a seeded order."""
    rng = spec.rng("functions", p.id)
    used = [f for f in p.functions if f["name"] in p.gold_names]
    others = [f for f in p.functions if f["name"] not in p.gold_names]
    chosen = used + rng.sample(others, max(0, min(len(others), k_max - len(used))))
    rng.shuffle(chosen)
    return chosen


def tool_example(p: ToolProblem, spec: BuildSpec, variant: str) -> SynthesisExample:
    """One example of problem `p` (RowError when its K falls outside the range)."""
    if variant == "schemas":
        functions = offered_functions(p, spec.k_max, spec)
        if len({f["name"] for f in functions} & p.gold_names) < len(p.gold_names):
            raise RowError("gold calls use more functions than max_branches")
        texts, role = [function_doc(f) for f in functions], "function"
    else:
        texts, role = [format_calls([canonical_call(g)]) for g in p.gold], "call"
    k = len(texts)
    if k < spec.k_min:
        raise RowError(f"fewer than min_branches {role}s")
    if k > spec.k_max:
        raise RowError(f"more {role}s than max_branches")
    branches = tuple(Branch(prompts.branch_prompt(role, p.question, i, k), t) for i, t in enumerate(texts))
    meta = {"builder": "aggregation", "kind": "tool calls", "variant": variant, "calls": len(p.gold),
            "answer": canonical_calls(p.gold)}
    return SynthesisExample(f"tools-{variant}/{spec.label}/{p.id}", "tool", p.question, branches,
                            canonical_calls(p.gold), meta)


def build_tool_calls(rows: Sequence[dict[str, Any]], spec: BuildSpec) -> BuildResult:
    variant = spec.variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"tool-call aggregation has variants {VARIANTS}, not {variant!r}")
    result = BuildResult([])
    for i, row in enumerate(rows):
        try:
            p = parse_problem(row, i)
            if splits.is_heldout(splits.TOOL_CALLS, p.id):
                result.skipped[HELDOUT] += 1
                continue
            result.examples.append(tool_example(p, spec, variant))
        except RowError as err:
            result.skipped[err.reason] += 1
    return result
