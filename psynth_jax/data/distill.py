"""Distillation examples (METHOD.md section 5, role c): targets written by text synthesis.

For each problem, K workers (the backbone, LoRA off, sampled) answer the standard worker prompt;
their texts become the branches (prefix "" = that same prompt), and the text-concatenation path
of the same backbone (greedy, every branch as text) writes the target the cache-path
synthesizer learns to reproduce. Requests are batched through ParallelSynthesis.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from psynth_jax.data.examples import Branch, SynthesisExample, to_json_line
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


def done_ids(path: Path) -> set[str]:
    """Ids already written to a jsonl output. A torn last line (the run was killed mid-write) is
    cut off; a torn line anywhere else is an error."""
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    ids, good = set(), []
    for i, line in enumerate(lines):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not an example row; fix or remove the file") from None
            print(f"[psynth] dropping an incomplete last line of {path}", file=sys.stderr)
            break
        good.append(line if line.endswith("\n") else line + "\n")
    if good != lines:
        path.write_text("".join(good), encoding="utf-8")
    return ids


def distill_to_jsonl(
    problems: Sequence[Problem],
    synth: ParallelSynthesis,
    path: Path,
    *,
    k: int,
    batch_size: int,
    worker_tokens: int,
    max_new_tokens: int,
    seed: int,
    worker_sampling: SamplingConfig = WORKER_SAMPLING,
) -> int:
    """Append the distillation examples of `problems` not yet in `path` (resumable: each batch is
    flushed as it completes, finished ids are skipped on restart). Returns how many were added."""
    from tqdm import tqdm

    done = done_ids(path)
    pending = [p for p in problems if f"distillation/{p.id}" not in done]
    if not pending:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = distill_batches(pending, synth, k=k, batch_size=batch_size, worker_tokens=worker_tokens,
                              max_new_tokens=max_new_tokens, seed=seed, worker_sampling=worker_sampling)
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(pending), desc="distill", unit="ex") as bar:
        for examples in batches:
            f.writelines(to_json_line(e) for e in examples)
            f.flush()
            bar.update(len(examples))
    return len(pending)
