"""Orbax checkpoints of a run's trainable state (mapper, LoRA, optimizer, step, data iterator).

Written by the trainer (psynth_jax/train/trainer.py), read back by it on resume and by whatever
imports a trained run (psynth_jax/interop/runs.py: the {lora, mapper} item only, no optimizer).
The frozen backbone is never saved: it is reloaded from its source. Saves are asynchronous and
atomic (Orbax writes to a temporary directory and renames it when complete), so an interrupted
save is never listed.

A checkpoint that exists but cannot be read is never deleted and never silently skipped. Readers
(export, adapters) report it and use an older one. The trainer (`repair=True`, under the run
directory's lock):
- when an older step is readable, resumes from it and moves every newer unreadable step aside
  to checkpoints/corrupt/<step>-<UTC time>/ (with REASON.txt), each move reported; the steps
  redone from the older one are then saved under their own numbers again;
- when none is readable, raises NothingRestorable and changes nothing, unless asked to restart
  (`psynth train --restart`): then all are moved aside and training starts from step 0, which is
  said plainly.
Since unreadable steps leave the step list, `keep` (Orbax's max_to_keep, which deletes the
oldest listed steps after a newer save completes) never deletes the only readable checkpoint
in favour of unreadable ones.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from psynth_jax import distributed

CORRUPT_DIR = "corrupt"


class NothingRestorable(ValueError):
    """Checkpoints exist and none can be read (an input error: the run directory is damaged)."""


def host_run_dir(directory: str) -> Path:
    """Where this host keeps a run's own files (config.yaml, metrics.jsonl, summary.json, TensorBoard):
    the run directory itself when it is local. A remote one (gs://bucket/run) holds the Orbax
    checkpoints, which Orbax writes there itself (`Checkpointer` takes the string as given:
    `Path("gs://b/r")` would collapse it to a local "gs:/b/r"), and the distillation cache
    (formats/paths.py); the host's files are rewritten at every logged step, so they stay local, in
    runs/remote/<scheme>/<bucket>/<path> under the working directory, said so in the log."""
    scheme, sep, rest = directory.partition("://")
    return Path("runs", "remote", scheme, rest.strip("/")) if sep else Path(directory)


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True):
        # Orbax needs absolute local paths; remote ones (gs://...) pass through unchanged
        remote = "://" in str(run_dir)
        self.directory = f"{run_dir}/checkpoints" if remote else Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )
        self._orphans = _OrphanedLoopCallbacks()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, train_state: dict[str, Any], data_state: dict[str, Any], *, force: bool = False) -> bool:
        """Save {trainable, opt_state} and the data iterator state at `step` (async by default)."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                train=ocp.args.StandardSave(train_state),
                data=ocp.args.JsonSave(json.loads(json.dumps(data_state, default=_jsonable))),
            ),
            force=force,
        )

    def restore_latest(self, abstract_train_state: Any, *, partial: bool = False, repair: bool = False,
                       restart: bool = False, log: Callable[[str], None] | None = None
                       ) -> tuple[int, Any, dict[str, Any] | None] | None:
        """(step, train_state, data_state) of the newest readable checkpoint; None when there is
        none (a new run, or `restart` with every checkpoint unreadable).

        partial: restore only the parts of the saved train state that `abstract_train_state` holds
        (an importer's {"trainable": ...}: the optimizer state is not read, so no optimizer is
        needed to describe it); data_state is then None.

        Every unreadable step tried is reported through `log` (default: a line on stderr). A reader
        (export, an adapter for demo/eval) changes nothing. The trainer, which holds the run's
        lock, passes `repair`: unreadable steps newer than the restored one are moved aside (see the
        module docstring). With no readable step at all, NothingRestorable is raised and nothing is
        moved, unless `restart` (with `repair`): then all are moved aside.
        """
        say = log or (lambda message: print(f"[psynth] {message}", file=sys.stderr, flush=True))
        failures: list[tuple[int, Exception]] = []
        restored = None
        self._orphans.install()  # a failed restore leaves Orbax reads behind: see _OrphanedLoopCallbacks
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(step, args=_restore_args(abstract_train_state, partial))
            except Exception as e:  # noqa: BLE001 - a damaged step, whatever Orbax raises for it
                failures.append((step, e))
                self._orphans.drain()
                if not repair:
                    say(f"checkpoint step {step} in {self.directory} is unreadable ({_short(e)}); trying an older one")
                continue
            restored = step, got["train"], None if partial else got["data"]
            break
        if restored is None and failures and not (repair and restart):
            listed = "; ".join(f"step {s}: {_short(e, 100)}" for s, e in failures)
            hint = (f" Rerun with --restart to move them aside to {self.directory}/{CORRUPT_DIR}/ and train from "
                    "step 0" if repair else "")
            raise NothingRestorable(f"no checkpoint in {self.directory} can be read ({listed}); nothing was "
                                    f"changed.{hint}")
        if failures and repair:
            if jax.process_index() == 0:  # one process moves; the others wait for it, then all agree
                for step, e in failures:
                    where = self.move_aside(step, e)
                    say(f"checkpoint step {step} is unreadable ({_short(e)}): moved to {where}")
            distributed.barrier("psynth_checkpoints_moved_aside")
            self.manager.reload()
        return restored

    def latest_shapes(self, key: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the leaves under `key` of the newest step's saved train state, by path ({} when
        there is no step or its metadata cannot be read: `restore_latest` then says why)."""
        step = self.manager.latest_step()
        if step is None:
            return {}
        try:
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(str(self.directory)) / str(step) / "train")[key]
        except Exception:  # noqa: BLE001 - unreadable metadata: restore_latest reports it and tries an older step
            return {}
        return leaf_shapes(saved)

    def move_aside(self, step: int, reason: BaseException) -> str:
        """Move step `step`'s directory to corrupt/<step>-<UTC time>/ with REASON.txt; return where."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        root = epath.Path(self.directory)
        target = root / CORRUPT_DIR / f"{step}-{stamp}"
        n = 1
        while target.exists():  # the same step moved twice within a second
            n += 1
            target = root / CORRUPT_DIR / f"{step}-{stamp}-{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        (root / str(step)).rename(target)
        (target / "REASON.txt").write_text(f"step {step} could not be restored:\n{reason!r}\n")
        return str(target)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self._orphans.uninstall()


class _OrphanedLoopCallbacks:
    """Silences the "RuntimeError: Event loop is closed" tracebacks a failed restore leaves.

    Orbax runs a restore on a fresh asyncio loop and closes that loop as soon as the restore
    raises. The other tensorstore reads of that restore are still in flight; when they finish,
    tensorstore calls `loop.call_soon_threadsafe` on the closed loop, and each such callback's
    RuntimeError reaches sys.unraisablehook (one traceback per array: about 36 for a small run).
    They carry nothing: the failure itself is reported with the step it concerns. This hook drops
    exactly those (RuntimeError "Event loop is closed" raised in call_soon_threadsafe) and passes
    everything else on to the previous hook. The reads that failed themselves end as asyncio tasks
    whose exception nobody retrieves; when they are collected, asyncio logs "Task exception was
    never retrieved" with the read's traceback. A filter on the asyncio logger drops exactly those
    (a traceback through Orbax's deserialization). After a failed restore, `drain` waits until the
    callbacks stop arriving; both then stay for the rest of the process, since a read's task can
    still be collected later, up to the interpreter's exit (seen once in CI under load, after the
    Checkpointer had closed). Without a failed restore they go when the Checkpointer closes.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.dropped = 0
        self.failed = False  # a restore failed: keep the hook and filter until the process exits

    def install(self) -> None:
        if self.previous is None:
            self.previous = sys.unraisablehook
            sys.unraisablehook = self
            logging.getLogger("asyncio").addFilter(self._filter_unretrieved)

    def drain(self, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
        """Wait until the abandoned reads of a failed restore have all called back (none for
        `quiet_s`; at most `limit_s`) before the next step is tried; marks the hook to stay."""
        self.failed = True
        seen, deadline = -1, time.monotonic() + limit_s
        while self.dropped != seen and time.monotonic() < deadline:
            seen = self.dropped
            time.sleep(quiet_s)
            gc.collect()  # the failed reads' tasks log their unretrieved exception when collected

    def uninstall(self) -> None:
        if self.failed:
            return
        if self.previous is not None and sys.unraisablehook is self:
            sys.unraisablehook = self.previous
        logging.getLogger("asyncio").removeFilter(self._filter_unretrieved)
        self.previous = None

    def _filter_unretrieved(self, record: logging.LogRecord) -> bool:
        """False (drop) for an unretrieved exception of a failed restore's read."""
        exc = record.exc_info[1] if record.exc_info else None
        if str(record.msg).startswith("Task exception was never retrieved") and _raised_in_orbax_read(exc):
            self.dropped += 1
            return False
        return True

    def __call__(self, unraisable: Any) -> None:
        if _is_orphaned_loop_callback(unraisable.exc_value):
            self.dropped += 1
            return
        (self.previous or sys.__unraisablehook__)(unraisable)


def _is_orphaned_loop_callback(exc: BaseException | None) -> bool:
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _raised_in_orbax_read(exc: BaseException | None) -> bool:
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename and "deserializ" in tb.tb_frame.f_code.co_name:
            return True
        tb = tb.tb_next
    return False


def _short(err: BaseException, limit: int = 160) -> str:
    """The first line of an Orbax/tensorstore error, cut to `limit` characters (they run to kilobytes)."""
    text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _restore_args(abstract_train_state: Any, partial: bool) -> Any:
    if partial:  # the train item only, and of it only the leaves asked for
        return ocp.args.Composite(train=ocp.args.PyTreeRestore(
            item=abstract_train_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_train_state),
            partial_restore=True))
    return ocp.args.Composite(train=ocp.args.StandardRestore(abstract_train_state), data=ocp.args.JsonRestore())


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"lora/layers/q/lora_a": shape, ...}: every leaf's shape by its path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in flat}


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a pytree (restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode()
    raise TypeError(f"cannot save {type(x).__name__} in the data iterator state")
