"""Restore a `psynth train` run's newest checkpoint (LoRA + mapper) onto a backbone.

Imports the training stack (orbax, optax) lazily, inside `restore_run` only, so the inference
path can import this module on a box without them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from psynth_jax.interop.adapter import AdapterError, describe_lora, with_lora
from psynth_jax.model.loaded import LoadedModel, parse_dtype
from psynth_jax.model.transformer import Decoder, LoRAConfig, LoRAParam
from psynth_jax.synthesis.mapper import Mapper, make_mapper

if TYPE_CHECKING:
    from psynth_jax.config import ExperimentConfig


@dataclasses.dataclass
class TrainedRun:
    """The newest restorable checkpoint of a `psynth train` run, applied to a backbone."""

    model: LoadedModel  # with the run's LoRA filled in
    mapper: Mapper
    step: int
    config: ExperimentConfig  # the run's config.yaml


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The ExperimentConfig saved in a run directory (its config.yaml)."""
    from psynth_jax.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config.yaml in {run_dir}: not a `psynth train` run directory")
    return load_config(path)


def _shape_mismatches(checkpointer: Any, skeleton: Any) -> list[str]:
    """Trainable leaves whose shape in the newest checkpoint differs from `skeleton`'s, named.

    Checked from Orbax's metadata before restoring, so a run trained on another backbone fails
    with the tensor names instead of an error from inside Orbax's asynchronous reads.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    step = checkpointer.manager.latest_step()
    if step is None:
        return []
    try:
        saved = ocp.StandardCheckpointHandler().metadata(
            epath.Path(str(checkpointer.directory)) / str(step) / "train")["trainable"]
    except Exception:  # unreadable metadata: restore_latest warns and falls back to an older step
        return []

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in flat}

    have, want = shapes(saved), shapes(skeleton["trainable"])
    return [f"{k}: saved {have.get(k)}, needed {v}" for k, v in want.items() if have.get(k) != v]


def restore_run(run_dir: str | Path, model: LoadedModel) -> TrainedRun:
    """Restore the newest readable checkpoint of `run_dir` onto `model`'s backbone.

    Builds the exact train-state skeleton the trainer saves ({trainable: {lora, mapper},
    opt_state}) from the run's config, so every shape is checked; the optimizer state is
    restored and dropped. Arrays land on this process's first device, whichever mesh saved them.
    Imports the training stack (orbax, optax) lazily, here only.
    """
    from psynth_jax.train.checkpointing import Checkpointer
    from psynth_jax.train.step import make_optimizer

    cfg = run_config(run_dir)
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoints/ in run directory {run_dir}")
    lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    dtype = parse_dtype(model.dtype_name)
    abstract = nnx.eval_shape(lambda: Decoder(model.cfg, lora=lora, dtype=dtype, rngs=nnx.Rngs(0)))
    _, lora_state, _ = nnx.split(abstract, LoRAParam, ...)
    mdef, mapper_state = nnx.split(make_mapper(cfg.mapper.kind, model.cfg.num_kv_heads, cfg.mapper.hidden))
    trainable = {"lora": lora_state, "mapper": mapper_state}
    t = cfg.train
    tx = make_optimizer(t.lr, t.steps, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                        decay=t.decay, clip_norm=t.clip_norm, grad_accum=t.grad_accum)
    skeleton = jax.eval_shape(lambda tr: {"trainable": tr, "opt_state": tx.init(tr)}, trainable)
    # restore onto one device of this process, whatever mesh the run was saved from (Orbax needs the
    # target topology); every process of a pod restores it whole onto its own first device
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    skeleton = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), skeleton)
    target = f"{model.source} ({model.cfg.family}, {model.cfg.num_layers} layers)"
    checkpointer = Checkpointer(run_dir, async_save=False)
    try:
        mismatches = _shape_mismatches(checkpointer, skeleton)
        if mismatches:
            raise AdapterError(f"run {run_dir} (trained on {cfg.model.source}) does not fit {target}: "
                               + "; ".join(mismatches[:3]))
        got = checkpointer.restore_latest(skeleton)
    finally:
        checkpointer.close()
    if got is None:
        raise AdapterError(f"no checkpoint in {run_dir} could be restored onto {target} with {describe_lora(lora)} "
                           f"and mapper {cfg.mapper.kind} (see the warnings above)")
    step, state, _ = got
    restored = state["trainable"]
    return TrainedRun(model=with_lora(model, lora, nnx.to_pure_dict(restored["lora"])),
                      mapper=nnx.merge(mdef, restored["mapper"]), step=step, config=cfg)
