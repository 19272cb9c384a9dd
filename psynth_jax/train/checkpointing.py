"""Orbax checkpoints of the trainable state (mapper, LoRA, optimizer, step, data iterator).

The frozen backbone is never saved: it is reloaded from its source. Saves are asynchronous and
atomic (Orbax writes to a temporary directory and renames it when complete), so an interrupted
save is never listed; a checkpoint that exists but cannot be read is skipped with a warning and
the next older one is tried, so a resume never crashes on a damaged step.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True):
        # Orbax needs absolute local paths; remote ones (gs://...) pass through unchanged
        remote = "://" in str(run_dir)
        self.directory = f"{run_dir}/checkpoints" if remote else Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )

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

    def restore_latest(self, abstract_train_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, train_state, data_state) of the newest readable checkpoint, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        train=ocp.args.StandardRestore(abstract_train_state), data=ocp.args.JsonRestore()
                    ),
                )
                return step, restored["train"], restored["data"]
            except Exception as e:  # a damaged step: warn and fall back to an older one
                warnings.warn(f"checkpoint at step {step} in {self.directory} is unreadable ({e!r}); "
                              "trying an older one", stacklevel=2)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a pytree (restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode()
    raise TypeError(f"cannot save {type(x).__name__} in the data iterator state")
