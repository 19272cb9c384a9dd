"""Example builders that need no model: exposure and aggregation (METHOD.md section 5, roles a-b).

exposure (step split): the worked solution's reasoning is cut into K contiguous chunks (at line
  breaks, else sentence ends, else spaces; chunking.py) and chunk i is branch i's output; its
  prefix is a worker prompt asking for part i of K. Target: the full worked solution ending in
  \\boxed{answer}. The synthesizer learns to read a solution spread over parallel caches. (The
  release's other exposure form, in-context examples as branches, is not built here.)
aggregation, variant "candidates": K candidate solutions, 1..K-1 of them correct (the gold
  solution) and the rest corrupted (one reasoning number and the final answer changed;
  corruption.py), in shuffled order. Target: the gold solution. Teaches picking the right one.
aggregation, variant "evidence": the question's statements (all sentences but the last) are
  split over K branches and the example's question is only its last sentence (the ask), so
  the facts needed exist only across branches. Target: the gold solution.

Every random choice comes from a `random.Random` seeded by (seed, builder, problem id), so an
example does not depend on which other rows were read (a `limit` keeps earlier examples).
K is one number, or several of which each problem draws one (seeded by its id).
Problems a builder cannot use (too few words to split, an answer without digits to corrupt) are
skipped and counted.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

from psynth_jax.data.build import BuildResult, example_rng
from psynth_jax.data.chunking import split_contiguous, split_last_sentence
from psynth_jax.data.corruption import corrupt_solution, wrong_answers
from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.data.problems import Problem

AggregationVariant = Literal["candidates", "evidence"]
MODEL_FREE_BUILDERS = ("exposure", "aggregation")


def exposure_example(p: Problem, k: int, seed: int) -> SynthesisExample | None:
    """Step-split exposure: branch i holds chunk i of the reasoning. None if too short.
    (Deterministic by construction: `seed` is taken only for the common builder signature.)"""
    chunks = split_contiguous(p.reasoning, k)
    if chunks is None:
        return None
    branches = tuple(
        Branch(f"{p.question}\n\nYou are worker {i + 1} of {k}. Write part {i + 1} of {k} of the worked solution.",
               chunk)
        for i, chunk in enumerate(chunks)
    )
    meta = {"builder": "exposure", "answer": p.answer}
    return SynthesisExample(f"exposure/{p.id}", p.family, p.question, branches, p.solution, meta)


def candidates_example(p: Problem, k: int, seed: int) -> SynthesisExample | None:
    """K candidate solutions, at least one correct and one wrong, shuffled. None if the answer
    has no number to corrupt."""
    if k < 2:
        raise ValueError(f"aggregation over candidates needs k >= 2, got {k}")
    rng = example_rng(seed, "aggregation", p.id)
    num_correct = rng.randint(1, k - 1)
    wrong = wrong_answers(p.answer, k - num_correct, rng)
    if wrong is None:
        return None
    candidates = [(p.solution, True, p.answer)] * num_correct
    candidates += [(corrupt_solution(p.solution, w, rng), False, w) for w in wrong]
    rng.shuffle(candidates)
    branches = tuple(
        Branch(f"{p.question}\n\nYou are worker {i + 1} of {k}. Propose a complete solution.", text)
        for i, (text, _, _) in enumerate(candidates)
    )
    meta = {
        "builder": "aggregation",
        "variant": "candidates",
        "answer": p.answer,
        "correct": [c for _, c, _ in candidates],
        "candidate_answers": [a for _, _, a in candidates],
    }
    return SynthesisExample(f"aggregation/{p.id}", p.family, p.question, branches, p.solution, meta)


def evidence_example(p: Problem, k: int, seed: int) -> SynthesisExample | None:
    """The question's statements split over K branches; the example's question is only the ask.
    None for a question without at least K words of statements before its last sentence."""
    facts, ask = split_last_sentence(p.question)
    chunks = split_contiguous(facts, k)
    if chunks is None:
        return None
    branches = tuple(
        Branch(f"You are worker {i + 1} of {k}. Report the information you were given about the task.", chunk)
        for i, chunk in enumerate(chunks)
    )
    meta = {"builder": "aggregation", "variant": "evidence", "answer": p.answer}
    return SynthesisExample(f"aggregation-evidence/{p.id}", p.family, ask, branches, p.solution, meta)


ExampleFn = Callable[[Problem, int, int], "SynthesisExample | None"]
_SKIP_REASON = {
    exposure_example: "reasoning has fewer than k words",
    candidates_example: "answer has no number to corrupt",
    evidence_example: "question has fewer than k words of statements",
}


def build_examples(
    problems: Sequence[Problem], builder: str, k: int | Sequence[int], seed: int, *,
    variant: AggregationVariant = "candidates",
) -> BuildResult:
    """Examples of one model-free builder ("exposure" | "aggregation") for every usable problem;
    `k` a number or the values each problem draws its K from."""
    if builder == "exposure":
        fn: ExampleFn = exposure_example
    elif builder == "aggregation":
        fn = {"candidates": candidates_example, "evidence": evidence_example}[variant]
    else:
        raise ValueError(f"builder {builder!r} needs no model only if it is one of {MODEL_FREE_BUILDERS}; "
                         "distillation examples are made by `psynth build-data --builder distillation`")
    choices = [k] if isinstance(k, int) else list(k)
    result = BuildResult([])
    for p in problems:
        kp = choices[0] if len(choices) == 1 else example_rng(seed, "k", p.id).choice(choices)
        example = fn(p, kp, seed)
        if example is None:
            result.skipped[_SKIP_REASON[fn]] += 1
        else:
            result.examples.append(example)
    return result
