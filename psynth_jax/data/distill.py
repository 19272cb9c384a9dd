"""Distillation examples (METHOD.md section 5, role c): targets written by text synthesis.

For each problem, K workers (the backbone, LoRA off, sampled) answer the standard worker prompt;
their texts become the branches (prefix "" = that same prompt), and the text-concatenation path
of the same backbone (greedy, every branch as text) writes the target the cache-path
synthesizer learns to reproduce. Requests are batched through ParallelSynthesis.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.data.problems import Problem
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.synthesis import prompts
from psynth_jax.synthesis.pipeline import ParallelSynthesis

WORKER_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95)


def batch_seed(seed: int, problems: Sequence[Problem]) -> int:
    """Sampling seed of one batch: fixed by the run seed and the batch's first problem, so a
    rerun of the same batch samples the same workers."""
    return (seed + zlib.crc32(problems[0].id.encode())) % 2**31


def distill_batches(
    problems: Sequence[Problem],
    synth: ParallelSynthesis,
    *,
    k: int,
    batch_size: int,
    worker_tokens: int,
    max_new_tokens: int,
    seed: int,
    worker_sampling: SamplingConfig = WORKER_SAMPLING,
) -> Iterator[list[SynthesisExample]]:
    """Yield the examples of each batch of `batch_size` problems as soon as it is done."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        wrong = [p.id for p in batch if p.family != synth.family]
        if wrong:
            raise ValueError(f"problems {wrong} are not of the synthesizer's family {synth.family!r}")
        s = batch_seed(seed, batch)
        convs = [[prompts.worker_messages(p.question, p.family)] * k for p in batch]
        workers = synth.run_workers(convs, max_new_tokens=worker_tokens, sampling=worker_sampling, seed=s)
        text = synth.text_path([p.question for p in batch], workers.texts, max_new_tokens=max_new_tokens, seed=s)
        yield [
            SynthesisExample(
                id=f"distillation/{p.id}",
                family=p.family,
                question=p.question,
                branches=tuple(Branch("", t) for t in branch_texts),
                target=target,
                meta={"builder": "distillation", "answer": p.answer, "worker_tokens": worker_tokens,
                      "max_new_tokens": max_new_tokens, "seed": seed},
            )
            for p, branch_texts, target in zip(batch, workers.texts, text.texts, strict=True)
        ]
