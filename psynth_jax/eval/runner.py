"""`run_eval(cfg)`: every benchmark of an EvalConfig through every configured mode, resumably.

For each task, examples are cut into fixed chunks of `batch_size` (in source order, equal K per
chunk). Per chunk:
1. worker stage (once per example, ever): K branches decoded with the LoRA off (or, for tasks
   whose branches are given, such as context paragraphs, their texts tokenized) and stored as
   token ids + texts in the run dir, so every mode, and every later session, sees the same ones;
2. each mode answers the chunk from those stored branches in one batched call, then times each
   request alone: TTFT is always a batch-1 latency, whatever `batch_size`. The cache modes
   rebuild the branch KV from the stored tokens (`branches_from_tokens`: prefill [worker prompt |
   output] with the frozen backbone, keep the output KV, which is what a worker holds in memory)
   once per chunk and share it; they differ only in mapper (identity / trained) and LoRA (off / on);
3. answers are scored and appended to records.jsonl at once.

A rerun of the same config skips every (task, id, mode) already recorded and reuses stored
branches; with nothing left to do it does not even load the model, and only rewrites the report.
Chunk boundaries and worker seeds depend only on the config and the example order, so a resumed
run decodes exactly the branches an uninterrupted one would have (raising a task's `limit` later
can only re-chunk its last, partial chunk: never at batch_size 1).

`psynth eval --retime` measures the TTFT of finished answers again on the machine it runs on,
from the stored branches, without answering again (`EvalRunner.retime`).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
from tqdm import tqdm

from psynth_jax import distributed
from psynth_jax.config.eval_schema import EvalConfig, dump_eval_config, fingerprint
from psynth_jax.eval import report
from psynth_jax.eval.example import EvalExample
from psynth_jax.eval.modes import (MODE_SPECS, ModeSpec, given_branches, make_chunks, worker_conversations,
                                  worker_seed)
from psynth_jax.eval.scoring import extract_answer, score_many
from psynth_jax.eval.store import BranchSet, ModeRecord, RunStore
from psynth_jax.eval.tasks import load_examples
from psynth_jax.formats.paths import AnyPath
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.interop.importer import with_adapter
from psynth_jax.interop.loader import load_model
from psynth_jax.measure.ttft import time_to_first_token
from psynth_jax.model.sharding import Rules, mesh_of
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.synthesis.pipeline import ParallelSynthesis, PathResult, PathSteps, answer_kl


@dataclasses.dataclass
class EvalOutcome:
    """What a session did: the run dir, results.json's content, and how much it computed."""

    run_dir: AnyPath  # the out_dir (formats/paths.py: local or gs://)
    results: dict[str, Any]
    computed: dict[str, int]  # worker_examples, worker_calls, records, mode_calls, retimed (this session only)


class EvalRunner:
    """One evaluation session over a run directory (new or resumed)."""

    def __init__(self, cfg: EvalConfig, *, model: Any = None, quiet: bool = False):
        """model: an already loaded `LoadedModel` (tests, notebooks); None loads `cfg.model` when needed."""
        self.cfg = cfg
        self.quiet = quiet
        self.examples = load_examples(cfg)
        # several processes (a pod): each answers every P-th chunk into its own part files (store.py)
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.store = RunStore(cfg.out_dir, fingerprint(cfg), dump_eval_config(cfg),
                              part=self.process if self.processes > 1 else None)
        self._model = model
        self.synth: ParallelSynthesis | None = None  # with the adapter's mapper and LoRA, built on first need
        self.identity: ParallelSynthesis | None = None  # the same with the identity mapper
        self._variants: dict[tuple[str, bool], ParallelSynthesis] = {}  # (task family, trained mapper) -> synth
        self.device = ""
        self.computed: collections.Counter[str] = collections.Counter()
        self._caches: dict[tuple[str, ...], Any] = {}
        n = cfg.timing_examples
        self.timed = {(t, ex.id) for t, exs in self.examples.items() for ex in (exs if n is None else exs[:n])}

    # ------------------------------------------------------------------------------ driver
    def run(self) -> EvalOutcome:
        """Answer every configured (task, example, mode) not yet recorded; write the report.

        With several processes each takes every P-th chunk (chunks are fixed by the config, so
        the shares are disjoint and together every chunk), on its own devices; process 0 merges
        the part files and writes the report once all are done.
        """
        t0 = time.perf_counter()
        chunks = [(task, chunk) for task, exs in self.examples.items()
                  for chunk in make_chunks(exs, self.cfg.batch_size, self.cfg.num_workers)]
        mine = distributed.process_share(chunks, self.process, self.processes)
        wanted = [(task, ex.id, m) for task, chunk in mine for ex in chunk for m in self.cfg.modes]
        done = sum(key in self.store.records for key in wanted)
        with tqdm(total=len(wanted), initial=done, desc="eval", unit="answer", disable=self.quiet or self.process != 0,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for task, chunk in mine:
                self._run_chunk(task, chunk, bar)
        if self.processes > 1:
            distributed.barrier("psynth_eval_answered")
            if self.process == 0:
                self.store.merge_parts()
                self.store = RunStore(self.cfg.out_dir, fingerprint(self.cfg), dump_eval_config(self.cfg))
            else:
                return EvalOutcome(self.store.dir, {}, dict(self.computed))
        return self._report(t0)

    def retime(self, tasks: Sequence[str] | None = None) -> EvalOutcome:
        """Measure again, on this device, the TTFT of every recorded answer that is timed; answers untouched.

        For timings taken while other work shared the machine, or to time on another device
        (an accelerator) answers computed elsewhere. Only the examples `timing_examples` selects,
        of `tasks` (default: every configured task), and only records without an error. Each new
        timing is appended as a record superseding the old one (records.jsonl keeps both lines;
        the later one counts), so an interruption loses nothing: a rerun times what is left.
        """
        if self.processes > 1:
            raise ValueError("--retime measures one device's latency: run it as a single process")
        t0 = time.perf_counter()
        names = self._tasks(tasks, "cannot retime")
        if self.cfg.timing_repeats == 0:
            raise ValueError("timing_repeats is 0: set timing_repeats >= 1 to retime")
        todo = [(t, ex) for t in names for ex in self.examples[t] if (t, ex.id) in self.timed]
        missing = [(t, ex.id, m) for t, ex in todo for m in self.cfg.modes if (t, ex.id, m) not in self.store.records]
        if missing:
            raise ValueError(f"{len(missing)} timed answers are not recorded yet (first: {missing[0]}): "
                             "finish the eval (run it without --retime) before retiming")
        with tqdm(total=len(todo) * len(self.cfg.modes), desc="retime", unit="answer", disable=self.quiet,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for task, ex in todo:
                self._ensure_synth()
                self._caches.clear()
                for mode in self.cfg.modes:
                    old = self.store.records[(task, ex.id, mode)]
                    if old.error is None:
                        ttft_s, breakdown = self._time(MODE_SPECS[mode], ex)
                        self.store.add_records([dataclasses.replace(old, ttft_s=ttft_s, breakdown=breakdown,
                                                                    device=self.device)])
                        self.computed["retimed"] += 1
                    bar.update(1)
        self._caches.clear()
        return self._report(t0)

    def measure_kl(self, tasks: Sequence[str] | None = None) -> EvalOutcome:
        """For every example the text path answered: the teacher-forced KL(text || mode) of each
        configured cache mode on the text path's own answer (`ParallelSynthesis.teacher_forced_kl`'s
        pieces: the text path's log-probabilities once per example, then each mode's), whether or
        not that mode has answered: no decoding, so a weight set is measured from a copy of a
        reference run's branches and text answers alone. Answers are untouched.

        Values are appended to kl.jsonl per example as they are measured, so an interruption loses
        nothing and a rerun measures what is left. A mode whose answer record is an error (it
        could not run on that example) and an empty text answer get no value (None).
        """
        if self.processes > 1:
            raise ValueError("--kl: run it as a single process")
        t0 = time.perf_counter()
        names = self._tasks(tasks, "cannot measure the KL of")
        if "text" not in self.cfg.modes:
            raise ValueError("--kl compares each cache mode with the text path: `modes` must include text")
        cache_modes = [m for m in self.cfg.modes if MODE_SPECS[m].path == "cache"]
        if not cache_modes:
            raise ValueError(f"--kl measures cache modes and `modes` has none: {list(self.cfg.modes)}")
        records, kl = self.store.records, self.store.kl
        todo = [(t, ex) for t in names for ex in self.examples[t]
                if (t, ex.id, "text") in records and records[(t, ex.id, "text")].error is None
                and any((t, ex.id, m) not in kl for m in cache_modes)]
        with tqdm(total=len(todo), desc="kl", unit="example", disable=self.quiet, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for task, ex in todo:
                self._ensure_synth()
                self._caches.clear()
                answer = self.synth.tok.encode(records[(task, ex.id, "text")].text, add_special_tokens=False)
                texts = [self._branch_set(ex).texts[j] for j in self._branch_set(ex).usable()]
                done: dict[tuple[str, str, str], float | None] = {}
                teacher = None
                for mode in cache_modes:
                    key = (task, ex.id, mode)
                    if key in kl:
                        continue
                    if not answer or (key in records and records[key].error is not None):
                        done[key] = None
                        continue
                    if teacher is None:  # the text path's side, once per example for every cache mode
                        teacher = self._variant(ex.family, False).text_answer_logprobs(ex.question, texts, answer)
                    spec = MODE_SPECS[mode]
                    student = self._variant(ex.family, spec.trained_mapper).cache_answer_logprobs(
                        ex.question, self._branch_caches([ex]), answer, lora=spec.lora)
                    done[key] = answer_kl(teacher, student)
                self.store.add_kl(done)
                self.computed["kl_measured"] += sum(v is not None for v in done.values())
                bar.update(1)
        self._caches.clear()
        return self._report(t0)

    def _tasks(self, tasks: Sequence[str] | None, what: str) -> list[str]:
        """`tasks` (None or empty: every configured task); a task the config does not list is an error."""
        names = list(self.examples) if not tasks else list(tasks)
        unknown = [t for t in names if t not in self.examples]
        if unknown:
            raise ValueError(f"{what} {unknown}: not among this config's tasks {list(self.examples)}")
        return names

    def _wanted(self) -> list[tuple[str, str, str]]:
        """Every configured (task, example id, mode), in source order."""
        return [(t, ex.id, m) for t, exs in self.examples.items() for ex in exs for m in self.cfg.modes]

    def _report(self, t0: float) -> EvalOutcome:
        """Build and write results.json / results.md / plots from every configured record stored."""
        records = [self.store.records[key] for key in self._wanted() if key in self.store.records]
        results = report.build_results(  # the report keeps the configured examples' and modes' KL values
            self.cfg, self.examples, records, self.store.weights(),
            session={"wall_s": time.perf_counter() - t0, "computed": dict(self.computed)}, kl=self.store.kl,
        )
        report.write_report(self.store.dir, results, records)
        return EvalOutcome(self.store.dir, results, dict(self.computed))

    def _run_chunk(self, task: str, chunk: list[EvalExample], bar: Any) -> None:
        pending = {m: [ex for ex in chunk if (task, ex.id, m) not in self.store.records] for m in self.cfg.modes}
        if not any(pending.values()):
            return
        self._ensure_synth()
        if any(todo for m, todo in pending.items() if MODE_SPECS[m].path != "single"):
            bar.set_postfix_str(f"{task} workers")
            self._ensure_branches(task, chunk)
        self._caches.clear()  # branch KV is shared by the cache modes of one chunk only
        for mode, todo in pending.items():
            if todo:
                bar.set_postfix_str(f"{task} {mode}")
                records = self._run_mode(mode, todo)
                self.store.add_records(records)
                self.computed["records"] += len(records)
                bar.update(len(records))

    # ------------------------------------------------------------------------------- model
    def _ensure_synth(self) -> None:
        """Load the backbone (LoRA attached, B = 0) and the adapter, on first need only."""
        if self.synth is not None:
            return
        m = self.cfg.model
        mesh, rules = self._mesh()
        model = self._model if self._model is not None else load_model(m.source, dtype=m.dtype, lora=LoRAConfig(),
                                                                        mesh=mesh, rules=rules)
        first = next(exs[0].family for exs in self.examples.values() if exs)
        chosen = self.cfg.handoff  # None: the adapter's recorded handoff, else the default
        synth = ParallelSynthesis(model, family=first, attn_impl=m.attn_impl, mesh=mesh, zero_copy=m.zero_copy,
                                  handoff=Handoff.from_config(chosen))
        if self.cfg.adapter is not None:
            synth, loaded = with_adapter(synth, self.cfg.adapter, convention=chosen.convention if chosen else None,
                                         stop_tokens=chosen.stop_tokens if chosen else None)
            description, mapper_trained, lora_trained = loaded.description, loaded.mapper_trained, loaded.lora_trained
        else:
            description = (f"untrained: identity mapper, LoRA B = 0, handoff "
                           f"{synth.handoff.convention}/{synth.handoff.stop_tokens}")
            mapper_trained = lora_trained = False
        model = synth.model
        self._check_budget(model.cfg.max_position_embeddings)
        weights = {
            "adapter": self.cfg.adapter,
            "description": description,
            "handoff": synth.handoff.as_dict(),
            "mapper_trained": mapper_trained,
            "lora_trained": lora_trained,
            # the configured name ("smollm2-135m", a hub id), not a machine's resolved file path
            "model": {"source": m.source if self._model is None else Path(model.source).name,
                      "checkpoint": Path(model.source).name, "family": model.cfg.family,
                      "num_layers": model.cfg.num_layers, "dtype": model.dtype_name, "attn_impl": m.attn_impl},
        }
        if self.process == 0:
            self.store.save_weights(weights)
        kind, backend = jax.devices()[0].device_kind, jax.default_backend()
        self.device = kind if kind.lower() == backend else f"{kind} ({backend})"
        self.synth = synth
        # last layer 0: the identity mapper
        self.identity = dataclasses.replace(synth, mapper=make_mapper("affine_length", model.cfg.num_kv_heads))

    def _check_budget(self, limit: int) -> None:
        """Refuse, before any answer, token budgets the model's positions cannot hold (every record
        would be an error and the run would "succeed"): the text path holds K branches of
        worker_tokens each and then max_new_tokens."""
        c = self.cfg
        workers = any(m != "single" for m in c.modes)
        need = (c.num_workers * c.worker_tokens if workers else 0) + c.max_new_tokens
        if need > limit:
            parts = f"num_workers {c.num_workers} x worker_tokens {c.worker_tokens} + " if workers else ""
            raise ValueError(f"{parts}max_new_tokens {c.max_new_tokens} = {need} positions, more than the model's "
                             f"{limit} (max_position_embeddings); lower worker_tokens or max_new_tokens")

    def _variant(self, family: str, trained_mapper: bool) -> ParallelSynthesis:
        """The synthesizer with `family`'s prompt templates and the trained (or the identity) mapper."""
        key = (family, trained_mapper)
        if key not in self._variants:
            self._variants[key] = dataclasses.replace(self.synth if trained_mapper else self.identity, family=family)
        return self._variants[key]

    def _mesh(self) -> tuple[Any, Any]:
        """(mesh, sharding rules) of the eval config over this process's devices: requests split
        over data, the model over fsdp x tensor; a given model keeps the mesh it was loaded on."""
        rules = Rules((r.name, r.axes) for r in self.cfg.mesh.rules)
        if self._model is not None and self._model.mesh is not None:
            return self._model.mesh, self._model.rules
        m = self.cfg.mesh
        # each process's own devices: processes split the chunks, not the model
        return mesh_of((m.data, m.fsdp, m.tensor), jax.local_devices()), rules

    # ------------------------------------------------------------------------ worker stage
    def _ensure_branches(self, task: str, chunk: list[EvalExample]) -> None:
        """Store the branches of the chunk's examples that have none yet: given ones tokenized, others decoded."""
        missing = [ex for ex in chunk if (task, ex.id) not in self.store.branches]
        given = [ex for ex in missing if given_branches(ex)]
        decode = [ex for ex in missing if not given_branches(ex)]
        if given:  # nothing to decode: the branch texts are the example's, as tokens
            tok = self.synth.tok
            self.store.add_branches([BranchSet(task, ex.id, 0, [tok.encode(t, add_special_tokens=False)
                                                                for t in given_branches(ex)], given_branches(ex))
                                     for ex in given])
        if decode:
            self.store.add_branches(self._decode_workers(task, decode))

    def _decode_workers(self, task: str, exs: list[EvalExample]) -> list[BranchSet]:
        cfg = self.cfg
        seed = worker_seed(cfg.seed, task, exs[0].id)
        convs = [worker_conversations(ex, cfg.num_workers) for ex in exs]
        sampling = SamplingConfig(temperature=cfg.worker_temperature, top_p=cfg.worker_top_p)
        try:
            out = self.synth.run_workers(convs, max_new_tokens=cfg.worker_tokens, sampling=sampling, seed=seed)
        except ValueError as err:  # e.g. a prompt too long for the model: isolate the example(s)
            if len(exs) > 1:
                return [s for ex in exs for s in self._decode_workers(task, [ex])]
            return [BranchSet(task, exs[0].id, seed, [], [], error=str(err))]
        self.computed["worker_calls"] += 1
        self.computed["worker_examples"] += len(exs)
        return [BranchSet(task, ex.id, seed, toks, texts) for ex, toks, texts in zip(exs, out.tokens, out.texts)]

    # ------------------------------------------------------------------------------ modes
    def _run_mode(self, mode: str, exs: list[EvalExample]) -> list[ModeRecord]:
        """Answer `exs` in `mode`: batched by usable branch count, failures isolated per example."""
        spec = MODE_SPECS[mode]
        if spec.path == "single":
            return self._answer(mode, spec, exs)
        groups: dict[int, list[EvalExample]] = collections.defaultdict(list)
        for ex in exs:
            groups[len(self._branch_set(ex).usable())].append(ex)
        records = [self._error(mode, ex, self._branch_set(ex).error or "every worker branch is empty")
                   for ex in groups.pop(0, [])]
        for group in groups.values():
            records += self._answer(mode, spec, group)
        return records

    def _answer(self, mode: str, spec: ModeSpec, exs: list[EvalExample]) -> list[ModeRecord]:
        try:
            result = self._call(spec, exs, self.cfg.max_new_tokens)
            timings = [self._time(spec, ex) for ex in exs]
        except ValueError as err:  # length checks etc.: retry alone, then record the error
            if len(exs) > 1:
                return [r for ex in exs for r in self._answer(mode, spec, [ex])]
            return [self._error(mode, exs[0], str(err))]
        self.computed["mode_calls"] += 1
        correct = score_many(exs, result.texts, workers=self.cfg.score_workers, timeout_s=self.cfg.code_timeout_s)
        records = []
        for i, ex in enumerate(exs):
            used = self._used_tokens(ex) if spec.path != "single" else []
            ttft_s, breakdown = timings[i]
            records.append(ModeRecord(
                task=ex.task, id=ex.id, mode=mode, answer=extract_answer(ex, result.texts[i]), correct=correct[i],
                text=result.texts[i], output_tokens=len(result.tokens[i]), prompt_tokens=result.prompt_tokens[i],
                branch_tokens=sum(map(len, used)), num_branches=len(used), ttft_s=ttft_s, breakdown=breakdown,
                device=self.device,
            ))
        return records

    def _time(self, spec: ModeSpec, ex: EvalExample) -> tuple[float | None, dict[str, float]]:
        """TTFT of one request alone (batch 1, a 1-token budget), whatever batch answered it.

        Only the first `timing_examples` examples of each task are timed (all when None): the
        path's steps timed by measure/ttft.py, a compile call first, then the median of
        `timing_repeats` calls from its first device work to its first sampled token.
        """
        if self.cfg.timing_repeats == 0 or (ex.task, ex.id) not in self.timed:
            return None, {}
        ttft = time_to_first_token(self._steps(spec, [ex], 1), self.cfg.timing_repeats)
        return ttft.total_s, dict(ttft.breakdown)

    def _call(self, spec: ModeSpec, exs: list[EvalExample], max_new_tokens: int) -> PathResult:
        """One batched answer of the synthesizer path behind `spec`."""
        return self._variant(exs[0].family, spec.trained_mapper).answer(self._steps(spec, exs, max_new_tokens))

    def _steps(self, spec: ModeSpec, exs: list[EvalExample], max_new_tokens: int) -> PathSteps:
        """The steps of the synthesizer path behind `spec` for `exs` (one task, so one family)."""
        cfg, synth = self.cfg, self._variant(exs[0].family, spec.trained_mapper)
        questions = [ex.question for ex in exs]
        kw = dict(max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=cfg.synth_temperature),
                  seed=cfg.seed)
        if spec.path == "single":
            return synth.single_steps(questions, **kw)
        if spec.path == "text":
            texts = [[self._branch_set(ex).texts[j] for j in self._branch_set(ex).usable()] for ex in exs]
            return synth.text_steps(questions, texts, **kw)
        return synth.cache_steps(questions, self._branch_caches(exs), lora=spec.lora, **kw)

    def _branch_caches(self, exs: list[EvalExample]) -> Any:
        """Branch KV of `exs` rebuilt from stored tokens, shared by the cache modes of the chunk."""
        key = tuple(ex.id for ex in exs)
        if key not in self._caches:
            prefixes = []
            for ex in exs:
                convs = worker_conversations(ex, self.cfg.num_workers)
                prefixes.append([self.synth.gen.chat_tokens(convs[j]) for j in self._branch_set(ex).usable()])
            outputs = [self._used_tokens(ex) for ex in exs]
            # a worker stopped on a stop token iff it produced fewer tokens than its budget (a
            # stop token that is the budget's last leaves worker_tokens - 1 output tokens)
            stopped = [[len(t) < self.cfg.worker_tokens for t in row] for row in outputs]
            self._caches[key] = self.synth.branches_from_tokens(prefixes, outputs, stopped)
        return self._caches[key]

    # ----------------------------------------------------------------------------- helpers
    def _branch_set(self, ex: EvalExample) -> BranchSet:
        return self.store.branches[(ex.task, ex.id)]

    def _used_tokens(self, ex: EvalExample) -> list[list[int]]:
        s = self._branch_set(ex)
        return [s.tokens[j] for j in s.usable()]

    def _error(self, mode: str, ex: EvalExample, message: str) -> ModeRecord:
        """A record for an example this mode could not answer: counted, and counted wrong."""
        return ModeRecord(task=ex.task, id=ex.id, mode=mode, answer="", correct=False, text="", output_tokens=0,
                          prompt_tokens=0, branch_tokens=0, num_branches=0, ttft_s=None,
                          breakdown={}, device=self.device, error=message)


def run_eval(cfg: EvalConfig, *, model: Any = None, quiet: bool = False,
             retime: Sequence[str] | None = None, kl: Sequence[str] | None = None) -> EvalOutcome:
    """Run (or resume) the evaluation `cfg` describes; write results.json / results.md / plots.

    retime: instead, measure the TTFT of these tasks' recorded answers again (`EvalRunner.retime`;
    an empty list: every task). kl: instead, measure the teacher-forced KL(text || cache mode) of
    these tasks' answers (`EvalRunner.measure_kl`; an empty list: every task).
    """
    runner = EvalRunner(cfg, model=model, quiet=quiet)
    if retime is not None:
        return runner.retime(retime)
    if kl is not None:
        return runner.measure_kl(kl)
    return runner.run()
