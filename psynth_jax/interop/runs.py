"""Restore a `psynth train` run's newest checkpoint (LoRA + mapper) onto a backbone.

Only the run's {lora, mapper} item is read (psynth_jax/checkpoints.py, a partial restore): no
optimizer is built and nothing of the training stack is imported. Orbax itself, an optional
dependency of the inference path, is imported inside `restore_run` only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import yaml
from flax import nnx

from psynth_jax.config import ExperimentConfig, load_config
from psynth_jax.config.typed import from_dict
from psynth_jax.formats.paths import as_path, is_remote
from psynth_jax.interop.adapter import AdapterError, describe_lora, with_lora
from psynth_jax.model.loaded import LoadedModel, parse_dtype
from psynth_jax.model.transformer import Decoder, LoRAConfig, LoRAParam
from psynth_jax.synthesis.mapper import Mapper, make_mapper


@dataclasses.dataclass
class TrainedRun:
    """The newest restorable checkpoint of a `psynth train` run, applied to a backbone."""

    model: LoadedModel  # with the run's LoRA filled in
    mapper: Mapper
    step: int
    config: ExperimentConfig  # the run's config.yaml


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The ExperimentConfig saved in a run directory (its config.yaml)."""
    path = as_path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config.yaml in {run_dir}: not a `psynth train` run directory")
    if is_remote(path):  # a stored config is resolved (no `base:` to follow): its text is the config
        return from_dict(ExperimentConfig, yaml.safe_load(path.read_text()) or {})
    return load_config(path)


def restore_run(run_dir: str | Path, model: LoadedModel) -> TrainedRun:
    """Restore the newest readable checkpoint of `run_dir` onto `model`'s backbone.

    Builds the exact skeleton of the trainable item the trainer saves ({lora, mapper}) from the
    run's config, so every shape is checked (from the checkpoint's metadata first, naming the
    tensors, then by the restore). Arrays land on this process's first device, whichever mesh saved
    them (every process of a pod restores the run whole onto its own first device).
    """
    from psynth_jax.checkpoints import Checkpointer, leaf_shapes  # orbax: imported when a run is read, not before

    cfg = run_config(run_dir)
    if not (as_path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoints/ in run directory {run_dir}")
    lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    dtype = parse_dtype(model.dtype_name)
    abstract = nnx.eval_shape(lambda: Decoder(model.cfg, lora=lora, dtype=dtype, rngs=nnx.Rngs(0)))
    _, lora_state, _ = nnx.split(abstract, LoRAParam, ...)
    mdef, mapper_state = nnx.split(make_mapper(cfg.mapper.kind, model.cfg.num_kv_heads, cfg.mapper.hidden))
    # restore onto one device of this process (jax.devices()[0] is process 0's), whatever mesh the run
    # was saved from: Orbax needs the target topology
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    skeleton = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            {"trainable": {"lora": lora_state, "mapper": mapper_state}})
    target = f"{model.source} ({model.cfg.family}, {model.cfg.num_layers} layers)"
    checkpointer = Checkpointer(run_dir, async_save=False)
    try:
        have = checkpointer.latest_shapes("trainable")
        mismatches = [f"{k}: saved {have.get(k)}, needed {v}" for k, v in leaf_shapes(skeleton["trainable"]).items()
                      if have and have.get(k) != v]
        if mismatches:
            raise AdapterError(f"run {run_dir} (trained on {cfg.model.source}) does not fit {target}: "
                               + "; ".join(mismatches[:3]))
        got = checkpointer.restore_latest(skeleton, partial=True)
    finally:
        checkpointer.close()
    if got is None:
        raise AdapterError(f"no checkpoint in {run_dir} could be restored onto {target} with {describe_lora(lora)} "
                           f"and mapper {cfg.mapper.kind} (see the warnings above)")
    step, state, _ = got
    restored = state["trainable"]
    return TrainedRun(model=with_lora(model, lora, nnx.to_pure_dict(restored["lora"])),
                      mapper=nnx.merge(mdef, restored["mapper"]), step=step, config=cfg)

