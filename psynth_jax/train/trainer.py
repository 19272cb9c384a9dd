"""The training loop: config -> mesh -> model + adapters -> data -> sharded steps -> checkpoints.

Resumes automatically from the run directory (trainable state, optimizer, step and data
iterator position), saves asynchronously every `checkpoint.every_steps`, saves and exits cleanly
on SIGTERM (preemption), logs a progress bar, TensorBoard scalars and metrics.jsonl, evaluates
held-out loss and cache/text greedy agreement every `eval_every` steps, and writes summary.json.
Unreadable checkpoints are moved aside, never skipped in silence (psynth_jax/checkpoints.py); each
step is logged once and a rerun of a finished run keeps its summary (train/run_log.py). The
caller holds the run directory's lock (`psynth train`: psynth_jax.cli.run_lock).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from tqdm import tqdm

from psynth_jax import distributed
from psynth_jax.checkpoints import Checkpointer, abstract_like, host_run_dir
from psynth_jax.formats.paths import as_path, is_remote
from psynth_jax.config import ExperimentConfig, dump_config, resolve_mesh_shape, validate
from psynth_jax.config.loader import read_yaml_mapping
from psynth_jax.config.resume import differing_fields
from psynth_jax.data.distill import distill_for_run
from psynth_jax.data.pipeline import make_train_iterator
from psynth_jax.data.sources import LoadedStage, check_source_tasks, load_stage
from psynth_jax.data.summary import data_summary, format_summary
from psynth_jax.inference.generator import stop_token_ids
from psynth_jax.interop.loader import load_model
from psynth_jax.interop.runs import restore_run
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.model.sharding import Rules, batch_sharding, make_mesh
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.agreement import agreement_rates, greedy_both_paths
from psynth_jax.train.objective import ObjectiveConfig, split_trainable
from psynth_jax.train.run_log import SUMMARY, MetricsLog, read_summary, summarize, write_summary
from psynth_jax.train.step import batch_shardings, make_eval_step, make_optimizer, make_train_step, place_train_state

AGREEMENT_TOKENS = 24


class NonFiniteTraining(RuntimeError):
    """The loss, the gradient norm or the parameters became NaN or inf (exit 1: a failure while running)."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every leaf of `tree` is finite (one reduction on device: a bool to fetch)."""
    import jax.numpy as jnp

    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class _Preemption:
    """When to stop and save: every process at the same step.

    One process: SIGTERM sets a flag the loop checks after each step. Several processes (a pod):
    the runtime's preemption notifier catches SIGTERM on whichever host gets it, and every
    process learns at the same sync step (distributed.preemption_agreed), so all save that step, once.
    """

    def __init__(self) -> None:
        self.local = jax.process_count() == 1
        self.flag = False
        if self.local:  # multi-process: JAX's notifier owns SIGTERM (a Python handler would hide it)
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.flag = True

    def requested(self, step: int) -> bool:
        return self.flag if self.local else distributed.preemption_agreed(step)


def _batch_dict(batch: Any) -> dict[str, np.ndarray]:
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dict(batch)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, *, model: LoadedModel | None = None, examples=None,
                 eval_examples=None, quiet: bool = False, restart: bool = False):
        """restart: when checkpoints exist and none is readable, move them aside and train from
        step 0 (`psynth train --restart`); without it that case raises NothingRestorable."""
        validate(cfg, num_devices=jax.device_count())
        check_source_tasks(cfg.data)  # an unknown `task:` fails before the backbone loads
        if cfg.train.compute_dtype != cfg.model.dtype:
            raise ValueError(
                f"train.compute_dtype={cfg.train.compute_dtype!r} must equal model.dtype={cfg.model.dtype!r}: "
                "activations are computed in the backbone's parameter dtype"
            )
        self.cfg = cfg
        self.quiet = quiet
        self.restart = restart
        self.run_dir = host_run_dir(cfg.checkpoint.dir)  # checkpoint.dir itself unless remote (gs://)
        self.mesh = make_mesh(resolve_mesh_shape(cfg.mesh, jax.device_count()))
        self.rules = Rules((r.name, r.axes) for r in cfg.mesh.rules)
        lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
        # every backbone tensor is read straight into its shard of the mesh (interop/loader.py)
        self.model = model or load_model(cfg.model.source, dtype=cfg.model.dtype, lora=lora, seed=cfg.train.seed,
                                         mesh=self.mesh, rules=self.rules)
        if self.model.lora != lora:
            raise ValueError(f"the given model's LoRA {self.model.lora} does not match the config's {lora}")
        mapper = make_mapper(cfg.mapper.kind, self.model.cfg.num_kv_heads, cfg.mapper.hidden, seed=cfg.train.seed)
        initial = self.model  # where the trainable LoRA starts (B = 0), unless another run's is taken
        if cfg.train.init_from:
            initial, mapper = self._init_from(cfg.train.init_from, mapper)
        decoder = nnx.merge(initial.graphdef, initial.state)
        self.graphdefs, trainable, frozen = split_trainable(decoder, mapper)
        t = cfg.train
        self.tx = make_optimizer(t.lr, t.steps, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                                 decay=t.decay, clip_norm=t.clip_norm, grad_accum=t.grad_accum)
        # placed by the rules (a loaded backbone is already; a model passed in may live elsewhere)
        self.trainable, self.opt_state, self.frozen = place_train_state(
            trainable, self.tx.init(trainable), frozen, self.mesh, self.rules)
        self.handoff = Handoff.from_config(cfg.handoff)
        self.opts = ObjectiveConfig(ce_weight=t.loss.ce_weight, kl_weight=t.loss.kl_weight,
                                    kl_temperature=t.loss.kl_temperature, remat=t.remat,
                                    attn_impl=cfg.model.attn_impl, handoff=self.handoff, zero_copy=cfg.model.zero_copy)
        self.stop_ids = stop_token_ids(self.model.tokenizer, self.model.cfg.eos_token_ids)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._data(examples, eval_examples)
        if is_remote(cfg.checkpoint.dir):
            self._log(f"checkpoints and the distillation cache go to {cfg.checkpoint.dir}; this host's run files "
                      f"(config, metrics, summary, TensorBoard) to {self.run_dir}")
        self.checkpointer = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save)
        self.step = 0
        self._step_fn = None
        # held-out KL(text || cache) is measured whatever the training loss weighs (kl_weight 0 included)
        self._eval_fn = make_eval_step(self.graphdefs, dataclasses.replace(self.opts, kl_weight=1.0), self.mesh)

    # ------------------------------------------------------------ init_from
    def _init_from(self, run_dir: str, mapper) -> tuple[LoadedModel, Any]:
        """(the backbone with another run's LoRA, its mapper): the newest checkpoint of `run_dir`
        (stage 2 from stage 1), not its optimizer state or step. A resumed run's own checkpoint
        replaces them (resume)."""
        run = restore_run(run_dir, self.model)
        if run.model.lora != self.model.lora or run.mapper.kind != mapper.kind:
            raise ValueError(f"train.init_from={run_dir}: that run has {run.model.lora} and mapper {run.mapper.kind}, "
                             f"this config {self.model.lora} and mapper {mapper.kind}")
        self._log(f"initialised mapper + LoRA from {run_dir} (its step {run.step})")
        return run.model, run.mapper

    # ----------------------------------------------------------------- data
    def _distill(self, src, items) -> list:
        """Distillation targets for raw rows, generated once by this backbone (LoRA off) and
        cached (resumably) under the run directory."""
        cache_dir = as_path(self.cfg.checkpoint.dir)  # the run directory, remote or not: a relaunch finds it
        examples, added, path = distill_for_run(self.model, src, items, self.cfg.data, cache_dir,
                                                model_source=self.cfg.model.source, attn_impl=self.cfg.model.attn_impl,
                                                handoff=self.handoff)
        self._log(f"distillation data for {src.path}: {added} generated now, cached in {path}")
        return examples

    def _data(self, examples, eval_examples) -> None:
        d = self.cfg.data
        if examples is None:
            stage = load_stage(d, "train", self._distill)
        else:  # given examples: no per-source report
            stage = LoadedStage(d.stage or "train", list(examples), [])
        index, count = self._batch_share()
        self.train_iter, self.data_stats = make_train_iterator(
            d, self.model.tokenizer, examples=stage.examples, shard_index=index, shard_count=count,
        )
        self.data_summary = data_summary(stage, self.data_stats)
        self._log(f"data summary (saved as data_summary.json):\n{format_summary(self.data_summary)}")
        if jax.process_index() == 0:
            (self.run_dir / "data_summary.json").write_text(json.dumps(self.data_summary, indent=2))
        if eval_examples is None and d.eval:
            eval_examples = load_stage(d, "eval", self._distill).examples
        # (source, batches): the held-out examples of each data.eval source, batched apart so the
        # evaluation reports each source beside the pooled figures
        self.eval_batches: list[tuple[str, dict[str, np.ndarray]]] = []
        by_source: dict[str, list] = {}
        for ex in eval_examples or []:
            by_source.setdefault(str(ex.meta.get("source") or "eval"), []).append(ex)
        for name, group in by_source.items():
            it, _ = make_train_iterator(d, self.model.tokenizer, examples=group, split="eval")
            self.eval_batches += [(name, _batch_dict(b)) for b in it]

    def _batch_share(self) -> tuple[int, int]:
        """(index, count) of the rows of each global batch this process reads: the rows its devices
        hold under the batch sharding (every row when the batch is not split across processes)."""
        rows = self.cfg.data.batch_size
        sharding = batch_shardings({"x": np.zeros((rows,))}, self.mesh, self.rules)["x"]
        spans = {(s[0].start or 0, s[0].stop if s[0].stop is not None else rows)
                 for s in sharding.addressable_devices_indices_map((rows,)).values()}
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != hi - lo or rows % (hi - lo) or lo % (hi - lo):
            raise ValueError(f"data.batch_size={rows}: this process's devices hold rows {sorted(spans)}, not one "
                             "contiguous share; choose a batch size the mesh's batch axes divide")
        return lo // (hi - lo), rows // (hi - lo)

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch from this process's rows (`_batch_share`): no process holds another's."""
        if jax.process_count() == 1:
            return jax.device_put(batch, batch_shardings(batch, self.mesh, self.rules))
        rows = self.cfg.data.batch_size  # the global batch: its sharding, not the local rows', decides
        out = {}
        for k, v in batch.items():
            shape = (rows, *np.shape(v)[1:])
            out[k] = jax.make_array_from_process_local_data(batch_sharding(shape, self.mesh, self.rules), v, shape)
        return out

    def _global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch every process holds whole (the eval batches): each places the shards it owns."""
        shardings = batch_shardings(batch, self.mesh, self.rules)
        return {k: jax.make_array_from_callback(np.shape(v), shardings[k], lambda idx, v=v: v[idx])
                for k, v in batch.items()}

    # ----------------------------------------------------------- checkpoints
    def _train_state(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "opt_state": self.opt_state}

    def check_same_run(self) -> None:
        """Refuse to resume a run directory that was started with a different experiment: only
        the step budget and logging/eval/checkpoint cadence may change between sessions, and the
        run directory may be spelled differently or moved (config/resume.py)."""
        saved = self.run_dir / "config.yaml"
        if not saved.is_file() or not self.checkpointer.steps():
            return
        free = {"train.steps", "eval_every", "log_every", "tensorboard", "checkpoint.dir", "checkpoint.every_steps",
                "checkpoint.keep", "checkpoint.async_save"}
        changed = differing_fields(read_yaml_mapping(saved), yaml.safe_load(dump_config(self.cfg)), free)
        if changed:
            raise ValueError(
                f"{self.run_dir} holds a run started with another config ({', '.join(changed)} differ); "
                "resume it with its own config.yaml or choose a new checkpoint.dir"
            )

    def resume(self) -> bool:
        """Restore the newest readable checkpoint of the run dir, if any (unreadable newer ones are
        moved aside and reported; none readable: NothingRestorable unless `restart`)."""
        had = self.checkpointer.steps()
        try:
            self.check_same_run()
            got = self.checkpointer.restore_latest(abstract_like(self._train_state()), repair=True,
                                                  restart=self.restart, log=self._log)
        except BaseException:
            self.checkpointer.close()  # the run stops here: finish Orbax's threads and its hooks
            raise
        if got is None:
            if had:
                self._log(f"--restart: none of the {len(had)} checkpoints could be read; they are moved aside, "
                          "training starts again from step 0")
            return False
        self.step, state, data_state = got
        self.trainable, self.opt_state = state["trainable"], state["opt_state"]
        self.train_iter.set_state(data_state)
        self._log(f"resumed from step {self.step} in {self.checkpointer.directory}")
        if self.restart:
            self._log("--restart was not needed: a readable checkpoint was resumed")
        return True

    def save(self, force: bool = False) -> None:
        if self.step in self.checkpointer.steps():  # the final save of a step already saved on schedule
            return
        if not bool(distributed.fetch(_all_finite(self.trainable))):
            raise NonFiniteTraining(f"step {self.step}: the mapper / LoRA parameters are not finite (NaN or inf); "
                                    f"not saved, {self._kept()}; lower train.lr")
        self.checkpointer.save(self.step, self._train_state(), self.train_iter.get_state(), force=force)

    def _check_finite(self, step: int, metrics: dict[str, Any]) -> None:
        """Stop at the first step whose loss or gradient norm is NaN or inf: nothing after it is
        saved (the metrics are fetched before every save), the last finite checkpoint is kept."""
        bad = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(float(metrics[k]))}
        if bad:
            what = ", ".join(f"{k} {v}" for k, v in bad.items())
            raise NonFiniteTraining(f"step {step}: {what}; training stopped, nothing of this step saved, "
                                    f"{self._kept()}; lower train.lr (or check the data)")

    def _kept(self) -> str:
        steps = self.checkpointer.steps()
        return f"the last checkpoint (step {max(steps)}) kept" if steps else "no checkpoint was saved"


    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, teacher-forced KL(text path || cache path) on the target and greedy
        cache/text agreement on data.eval: pooled (eval_ce, eval_kl, eval_agreement; CE and KL
        per target token, agreement per example) and per source (eval_ce/SOURCE, ...)."""
        if not self.eval_batches:
            return {}
        sums: dict[str, list[float]] = {}  # source -> [ce * tokens, kl * tokens, tokens]
        rates: dict[str, list[float]] = {}
        for source, batch in self.eval_batches:
            dev = self._global_batch(batch)
            m = distributed.fetch(self._eval_fn(self.trainable, self.frozen, dev))
            n = float(m["target_tokens"])
            acc = sums.setdefault(source, [0.0, 0.0, 0.0])
            acc[0] += float(m["ce"]) * n
            acc[1] += float(m["kl"]) * n
            acc[2] += n
            with jax.set_mesh(self.mesh):  # the context mesh splash attention shards over
                out = greedy_both_paths(self.graphdefs, self.trainable, self.frozen, dev,
                                        max_new_tokens=AGREEMENT_TOKENS, stop_ids=self.stop_ids, opts=self.opts)
            # tokens span every process
            rates.setdefault(source, []).extend(agreement_rates(*distributed.fetch(out), batch["example_valid"]))

        def figures(acc: list[float], r: list[float], suffix: str = "") -> dict[str, float]:
            return {f"eval_ce{suffix}": acc[0] / max(acc[2], 1.0), f"eval_kl{suffix}": acc[1] / max(acc[2], 1.0),
                    f"eval_agreement{suffix}": statistics.fmean(r) if r else float("nan")}

        pooled = [sum(a[i] for a in sums.values()) for i in range(3)]
        out = figures(pooled, [x for r in rates.values() for x in r])
        for source, acc in sums.items():
            out.update(figures(acc, rates[source], f"/{source}"))
        return out

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        primary = jax.process_index() == 0
        previous = read_summary(self.run_dir)
        if self.step >= t.steps and previous is not None:
            self._log(f"the run finished at step {self.step} (train.steps={t.steps}): nothing to train, "
                      f"{self.run_dir / SUMMARY} kept")
            self.checkpointer.close()
            return previous
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        preempt = _Preemption()
        writer = self._tensorboard()
        # a finished run without summary.json (stopped before writing it) evaluates its last step again
        metrics = MetricsLog(self.run_dir, self.step, redo_eval=self.step >= t.steps, enabled=primary)
        if metrics.dropped:
            self._log(f"{metrics.path.name}: dropped {metrics.dropped} lines logged after step {self.step} "
                      "(those steps are redone and logged again)")
        session: dict[str, Any] = {"start_step": self.step, "data": self.data_stats_dict()}
        self._log(f"data: {self.data_stats.summary()}")
        if self.step == 0 and self.eval_batches:
            self._record(metrics, writer, 0, self.evaluate())
        bar = tqdm(total=t.steps, initial=self.step, desc="train", disable=self.quiet or jax.process_index() != 0,
                   dynamic_ncols=True)
        tokens_seen, t0 = 0.0, time.perf_counter()
        pending: list[tuple[int, Any]] = []  # (step, device metrics) not fetched yet

        def flush() -> None:
            """Fetch the pending steps' metrics: one host sync every log_every steps, not every step."""
            if not pending:
                return
            fetched = distributed.fetch([m for _, m in pending])
            tok_s = tokens_seen / max(time.perf_counter() - t0, 1e-9)
            for step, m in zip((s for s, _ in pending), fetched):
                self._check_finite(step, m)
            for (step, _), m in zip(pending, fetched):
                self._record(metrics, writer, step, dict({k: float(v) for k, v in m.items()}, tokens_per_s=tok_s))
            bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4f}", tok_s=f"{tok_s:.0f}")
            pending.clear()

        while self.step < t.steps:
            batch = _batch_dict(next(self.train_iter))
            if self.opts.kl_weight == 0:  # the text-path arrays only feed the KL teacher: fewer shapes
                batch = {k: v for k, v in batch.items() if not k.startswith("text_")}
            dev = self._device_batch(batch)
            if self._step_fn is None:
                self._step_fn = make_train_step(self.graphdefs, self.tx, self.opts, self.mesh, self.rules,
                                                self.trainable, self.opt_state, self.frozen, dev)
            self.trainable, self.opt_state, m = self._step_fn(self.trainable, self.opt_state, self.frozen, dev)
            self.step += 1
            pending.append((self.step, m))
            tokens_seen += float(batch["synth_len"].sum() + batch["branch_len"].sum() + batch["branch_prefix_len"].sum())
            bar.update(1)
            stop = preempt.requested(self.step)
            evaluate = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < t.steps
            save = self.step % cfg.checkpoint.every_steps == 0
            if self.step % cfg.log_every == 0 or stop or evaluate or save:
                flush()
            if evaluate:
                self._record(metrics, writer, self.step, self.evaluate())
            if save:
                self.save()
            if stop:
                self._log(f"preemption (SIGTERM): every process saves step {self.step} and exits")
                self.save(force=True)
                self.checkpointer.close()
                bar.close()
                metrics.close()
                sys.exit(143)
        flush()
        bar.close()
        self.save(force=True)
        self._record(metrics, writer, self.step, self.evaluate())
        self.checkpointer.close()
        records = metrics.records()
        metrics.close()
        if self.step > session["start_step"]:
            session["train_tokens_per_s"] = tokens_seen / max(time.perf_counter() - t0, 1e-9)
        elif previous is not None and "train_tokens_per_s" in previous:
            session["train_tokens_per_s"] = previous["train_tokens_per_s"]  # nothing trained now: keep the real figure
        summary = summarize(records, self.step, **session)
        if primary:
            write_summary(self.run_dir, summary)
        return summary

    # ------------------------------------------------------------- logging
    def data_stats_dict(self) -> dict[str, Any]:
        """The pipeline's DataStats (kept / skipped by reason / buckets) as JSON-able data."""
        return dataclasses.asdict(self.data_stats)

    def _tensorboard(self):
        if not self.cfg.tensorboard or jax.process_index() != 0:
            return None
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _record(self, log: MetricsLog, writer, step: int, metrics: dict[str, float]) -> None:
        if not metrics or jax.process_index() != 0:
            return
        log.append(step, metrics)
        if writer is not None and (step % self.cfg.log_every == 0 or any(k.startswith("eval") for k in metrics)):
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            writer.flush()

    def _log(self, msg: str) -> None:
        if jax.process_index() == 0:
            print(f"[psynth train] {msg}", file=sys.stderr, flush=True)
