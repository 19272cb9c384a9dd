"""Distillation examples (METHOD.md section 5, role c): targets written by text synthesis.

Every task family is distilled the same way. For each item, the branches are K worker outputs
(the backbone, LoRA off, sampled from the family's worker prompt; one worker per expert profile
where the task has profiles, as MARBLE), or the item's given branches (evidence paragraphs,
function docs: nothing to sample); the text-concatenation path of the same backbone (greedy,
every branch as text, the family's synthesizer prompt) writes the target the cache-path
synthesizer learns to reproduce. Requests are batched through ParallelSynthesis (items of one
family and one K per batch) and appended to a jsonl file batch by batch, so a rerun resumes; the
file may be remote (gs://..., formats/paths.py), e.g. a pod run's cache under its gs:// run directory.

Items come from GSM8K / MATH rows (family math) or from any evaluation task's rows, read by that
task's converter (`items_from_task`: code, multiple choice, multi-hop QA, diagnosis, tool calls);
rows a task holds out for evaluation are never distilled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
from tqdm import tqdm

from psynth_jax import distributed
from psynth_jax.config.schema import DataConfig, DataSourceConfig
from psynth_jax.data.build import example_rng
from psynth_jax.data.examples import Branch, SynthesisExample, read_examples, to_json_line
from psynth_jax.data.problems import Problem
from psynth_jax.eval.tasks import TASKS, task_converter
from psynth_jax.formats import splits
from psynth_jax.formats.paths import AnyPath, append_text, replace_text
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.synthesis import prompts
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.pipeline import ParallelSynthesis

WORKER_TEMPERATURE, WORKER_TOP_P = 0.7, 0.95


@dataclasses.dataclass(frozen=True)
class DistillItem:
    """One request to distill: its question and family, and how its branches arise.

    role_hints: one sampled worker per hint (expert profiles). given: branch texts that are given,
    not sampled (their worker prompts are prompts.branch_prompt(given_role, ...)).
    """

    id: str
    family: str
    question: str
    answer: str
    role_hints: tuple[str, ...] = ()
    given: tuple[str, ...] = ()
    given_role: str = ""

    def num_branches(self, k: int) -> int:
        return len(self.given) or len(self.role_hints) or k

    def worker_conversations(self, k: int) -> list[list[dict[str, str]]]:
        if self.role_hints:
            return [prompts.worker_messages(self.question, self.family, role_hint=h) for h in self.role_hints]
        return [prompts.worker_messages(self.question, self.family)] * k

    def branches(self, texts: Sequence[str]) -> tuple[Branch, ...]:
        k = len(texts)
        if self.given:
            return tuple(Branch(prompts.branch_prompt(self.given_role, self.question, i, k), t)
                         for i, t in enumerate(texts))
        hints = self.role_hints or ("",) * k
        return tuple(Branch("", t, h) for t, h in zip(texts, hints, strict=True))


def item_from_problem(p: Problem) -> DistillItem:
    return DistillItem(p.id, p.family, p.question, p.answer)


def items_from_task(task: str, rows: Sequence[dict[str, Any]], label: str, seed: int
                    ) -> tuple[list[DistillItem], collections.Counter[str]]:
    """Items of rows read by evaluation task `task`'s converter (its family, question, expert
    profiles, given branches), without the rows that task holds out; skipped rows by reason."""
    spec = TASKS[task]
    convert = task_converter(task)
    items, skipped = [], collections.Counter()
    for i, row in enumerate(rows):
        try:
            ex = convert(row, i, seed)
        except (KeyError, ValueError, TypeError) as err:
            skipped[getattr(err, "reason", f"not a {task} row")] += 1
            continue
        if spec.heldout is not None and splits.is_heldout(spec.heldout, ex.extra["row_id"]):
            skipped["held out for evaluation"] += 1
            continue
        x = ex.extra
        items.append(DistillItem(f"{label}/{ex.id}", ex.family, ex.question, ex.gold,
                                 role_hints=tuple(x.get("profiles") or ()), given=tuple(x.get("branches") or ()),
                                 given_role=str(x.get("branch_role") or "")))
    return items, skipped


def batch_seed(seed: int, items: Sequence[DistillItem]) -> int:
    """Sampling seed of one batch: fixed by the run seed and the batch's first item, so a rerun of
    the same batch samples the same workers."""
    return (seed + zlib.crc32(items[0].id.encode())) % 2**31


def plan_batches(items: Sequence[DistillItem], k: int | Sequence[int], batch_size: int, seed: int
                 ) -> list[tuple[int, list[DistillItem]]]:
    """(K, items) batches: items of one family, one K and one kind (given or sampled branches),
    in first-seen order, at most batch_size each. `k`: the sampled workers' K, one value or values
    each item draws from (seeded by its id)."""
    choices = [k] if isinstance(k, int) else list(k)
    groups: dict[tuple[str, int, bool], list[DistillItem]] = {}
    for item in items:
        kk = choices[0] if len(choices) == 1 else example_rng(seed, "k", item.id).choice(choices)
        groups.setdefault((item.family, item.num_branches(kk), bool(item.given)), []).append(item)
    return [(key[1], group[s : s + batch_size]) for key, group in groups.items()
            for s in range(0, len(group), batch_size)]


def distill_batches(
    items: Sequence[DistillItem],
    synth: ParallelSynthesis,
    *,
    k: int | Sequence[int],
    batch_size: int,
    worker_tokens: int,
    max_new_tokens: int,
    seed: int,
    worker_sampling: SamplingConfig | None = None,
    share: tuple[int, int] = (0, 1),
) -> Iterator[list[SynthesisExample]]:
    """Yield the examples of each batch as soon as it is done (batches: `plan_batches`).

    share: (index, count): only every count-th planned batch from `index` (one process's share of
    a multi-process run; the plan is the same on every process, so the shares are disjoint).
    """
    if batch_size < 1 or min([k] if isinstance(k, int) else k, default=0) < 1:
        raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    sampling = worker_sampling or SamplingConfig(temperature=WORKER_TEMPERATURE, top_p=WORKER_TOP_P)
    index, count = share
    by_family = {synth.family: synth}  # a synthesizer with each family's prompt templates (workers, text path)
    for kk, batch in plan_batches(items, k, batch_size, seed)[index::count]:
        s = batch_seed(seed, batch)
        family = batch[0].family
        if family not in by_family:
            by_family[family] = dataclasses.replace(synth, family=family)
        synth_f = by_family[family]
        if batch[0].given:
            texts = [list(item.given) for item in batch]
        else:
            convs = [item.worker_conversations(kk) for item in batch]
            texts = synth_f.run_workers(convs, max_new_tokens=worker_tokens, sampling=sampling, seed=s).texts
        text = synth_f.text_path([item.question for item in batch], texts, max_new_tokens=max_new_tokens, seed=s)
        yield [
            SynthesisExample(
                id=f"distillation/{item.id}", family=item.family, question=item.question,
                branches=item.branches(branch_texts), target=target,
                meta={"builder": "distillation", "answer": item.answer, "worker_tokens": worker_tokens,
                      "max_new_tokens": max_new_tokens, "seed": seed},
            )
            for item, branch_texts, target in zip(batch, texts, text.texts, strict=True)
        ]


def part_path(path: Path, index: int) -> Path:
    """Process `index`'s own file beside `path` in a multi-process run: x.jsonl -> x.p<index>.jsonl."""
    return path.with_name(f"{path.stem}.p{index}{path.suffix}")


def _parts(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.p*{path.suffix}"))


def merge_parts(path: Path) -> None:
    """Fold every process's part file into `path` (each id once, `path`'s own lines first), then
    remove the parts; written to a temporary file and renamed, so an interruption loses nothing."""
    parts = _parts(path)
    if not parts:
        return
    seen, lines = set(), []
    for source in [path, *parts]:
        if not source.is_file():
            continue
        for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                eid = json.loads(line)["id"]
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line of an interrupted process: redone by the next run
            if eid not in seen:
                seen.add(eid)
                lines.append(line if line.endswith("\n") else line + "\n")
    replace_text(path, "".join(lines))
    for part in parts:
        part.unlink()


def known_ids(path: Path) -> set[str]:
    """Ids in `path` and in every process's part file beside it (read only: nothing repaired)."""
    return {i for f in [path, *_parts(path)] if f.is_file() for i in done_ids(f, repair=False)}


def done_ids(path: Path, repair: bool = True) -> set[str]:
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
    if good != lines and repair:
        path.write_text("".join(good), encoding="utf-8")
    return ids


def distill_to_jsonl(
    items: Sequence[DistillItem],
    synth: ParallelSynthesis,
    path: Path,
    *,
    k: int | Sequence[int],
    batch_size: int,
    worker_tokens: int,
    max_new_tokens: int,
    seed: int,
    worker_sampling: SamplingConfig | None = None,
) -> int:
    """Append the distillation examples of `items` not yet in `path` (resumable: each batch is
    flushed as it completes, finished ids are skipped on restart). Returns how many were added.

    Several processes (a pod), two ways, by where the synthesizer's model lives:
    - on each process's own devices (`psynth build-data`): each generates its share of the
      batches into its own part file (`part_path`), then process 0 merges them into `path`
      (`merge_parts`) once all are done, so every example is built exactly once; a relaunch reads
      `path` and every part;
    - on a mesh over every process's devices (the trainer's model): every program runs on every
      process, so all generate every batch together (requests split over the mesh's batch axes)
      from the same pending list, process 0's, and process 0 alone writes `path`.
    """
    index, count = jax.process_index(), jax.process_count()
    together = count > 1 and distributed.spans_processes(synth.mesh)
    if together:
        done = set(distributed.broadcast_object(sorted(done_ids(path)) if distributed.is_main() else None))
        own, share = (path if distributed.is_main() else None), (0, 1)
    else:
        own = path if count == 1 else part_path(path, index)
        done = done_ids(own) | {i for other in [path, *_parts(path)] if other != own and other.is_file()
                                for i in done_ids(other, repair=False)}
        share = (index, count)
    pending = [item for item in items if f"distillation/{item.id}" not in done]
    added = 0
    if pending:
        if own is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        batches = distill_batches(pending, synth, k=k, batch_size=batch_size, worker_tokens=worker_tokens,
                                  max_new_tokens=max_new_tokens, seed=seed, worker_sampling=worker_sampling,
                                  share=share)
        with tqdm(total=len(pending), desc="distill", unit="ex", disable=not distributed.is_main()) as bar:
            for examples in batches:
                if own is not None:
                    append_text(own, "".join(to_json_line(e) for e in examples))
                added += len(examples)
                bar.update(len(examples) * (1 if together else count))
    if count > 1 and not together:
        distributed.barrier("psynth_distill_generated")
        if distributed.is_main():
            merge_parts(path)
        distributed.barrier("psynth_distill_merged")
    return added


def run_cache_path(run_dir: AnyPath, src: DataSourceConfig, d: DataConfig, model_source: str) -> AnyPath:
    """Where a training run caches the distillation examples of one source: keyed by everything
    that changes them (rows read, K, sampling budget, seed, backbone), not by cap / weight / name."""
    key = repr((src.path, src.split, src.subset, src.limit, src.task, src.k, d.num_branches, d.seed,
                d.distill_worker_tokens, d.distill_max_new_tokens, model_source))
    stem = Path(src.path).stem.strip("*") or "source"
    return run_dir / "distill" / f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.jsonl"


def distill_for_run(model: LoadedModel, src: DataSourceConfig, items: Sequence[DistillItem], d: DataConfig,
                    run_dir: AnyPath, *, model_source: str, attn_impl: str, handoff: Handoff | None = None,
                    ) -> tuple[list[SynthesisExample], int, Path]:
    """(examples of `items`, how many were generated now, the cache file): generated once by the
    backbone (LoRA off; workers stop as `handoff` says) and cached, resumably, under the run directory."""
    path = run_cache_path(run_dir, src, d, model_source)
    synth = ParallelSynthesis(model, attn_impl=attn_impl, handoff=handoff or Handoff())
    added = distill_to_jsonl(items, synth, path, k=src.k or d.num_branches, batch_size=d.distill_batch_size,
                             worker_tokens=d.distill_worker_tokens, max_new_tokens=d.distill_max_new_tokens,
                             seed=d.seed)
    wanted = {f"distillation/{item.id}" for item in items}
    if jax.process_count() > 1 and distributed.spans_processes(model.mesh):  # process 0 wrote it: read it there
        rows = distributed.broadcast_object([e.to_dict() for e in read_examples(path)] if distributed.is_main() else None)
        examples = [SynthesisExample.from_dict(r) for r in rows]
    else:
        examples = read_examples(path)
    return [e for e in examples if e.id in wanted], added, path
