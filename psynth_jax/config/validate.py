"""Semantic checks on a typed config, run before any compute, and mesh shape resolution.

`validate` catches what types cannot: ranges, cross-field consistency, local paths that do not
exist, and (given a device count) a mesh that cannot be built. Every message starts with the
dotted field it concerns; all problems are reported together.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from psynth_jax.config.schema import DataConfig, DataSourceConfig, ExperimentConfig, MeshConfig
from psynth_jax.config.typed import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Suffixes that only ever name local files, never hub ids.
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow", ".gguf", ".safetensors")
# aggregation variants per row format (data/sources.py); the first of each is the default
AGGREGATION_VARIANTS = {"problems": ("candidates", "evidence"), "multihop": ("short", "reasoned"),
                        "bfcl": ("schemas", "calls")}


def validate(cfg: ExperimentConfig, num_devices: int | None = None) -> None:
    """Raise ValueError listing every semantic problem; also checks the mesh when `num_devices` is given."""
    errors = [
        *_check_paths(cfg),
        *_check_numbers(cfg),
        *_mesh_errors(cfg.mesh),
    ]
    if not errors and num_devices is not None:
        try:
            resolve_mesh_shape(cfg.mesh, num_devices)
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError(errors)


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`, filling the one -1 axis; ValueError if impossible."""
    errors = _mesh_errors(mesh)
    if errors:
        raise ConfigError(errors)
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    described = ", ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    fixed_axes = [axis for axis, size in sizes.items() if size != -1]
    fixed = math.prod(sizes[axis] for axis in fixed_axes)
    product = "*".join(fixed_axes)
    if len(fixed_axes) < len(MESH_AXES):
        if num_devices % fixed:
            raise ValueError(f"impossible mesh: {product}={fixed} does not divide {num_devices} devices ({described})")
        auto = next(axis for axis, size in sizes.items() if size == -1)
        sizes[auto] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"impossible mesh: {product}={fixed} but {num_devices} devices ({described})")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _mesh_errors(mesh: MeshConfig) -> list[str]:
    errors = [
        f"mesh.{axis} must be a positive size or -1 (all remaining devices), got {getattr(mesh, axis)}"
        for axis in MESH_AXES
        if getattr(mesh, axis) == 0 or getattr(mesh, axis) < -1
    ]
    auto = [f"mesh.{axis}" for axis in MESH_AXES if getattr(mesh, axis) == -1]
    if len(auto) > 1:
        errors.append(f"at most one mesh axis may be -1, got {' and '.join(auto)}")
    return errors


def _check_paths(cfg: ExperimentConfig) -> list[str]:
    errors = []
    if _missing_local_path(cfg.model.source):
        errors.append(f"model.source: local path {cfg.model.source!r} does not exist")
    init = cfg.train.init_from
    if init is not None and "://" not in init and not (Path(init).expanduser() / "config.yaml").is_file():
        errors.append(f"train.init_from: {init!r} is not a `psynth train` run directory (no config.yaml there)")
    for split in ("train", "eval"):
        sources: tuple[DataSourceConfig, ...] = getattr(cfg.data, split)
        for i, source in enumerate(sources):
            if _missing_local_path(source.path):
                errors.append(
                    f"data.{split}[{i}].path: local path {source.path!r} does not exist "
                    f"(relative paths are read from the working directory {os.getcwd()})"
                )
    return errors


def _missing_local_path(path: str) -> bool:
    """True for a path that can only be local (not a hub id or URL) and is not there (a glob
    pattern: that matches no file)."""
    if "://" in path:
        return False
    if glob.has_magic(path):
        return not glob.glob(os.path.expanduser(path))
    looks_local = path.startswith((".", "/", "~")) or path.endswith(_LOCAL_SUFFIXES)
    return looks_local and not Path(path).expanduser().exists()


def _check_numbers(cfg: ExperimentConfig) -> list[str]:
    d, t = cfg.data, cfg.train
    checks = [
        (cfg.lora.rank >= 1, f"lora.rank must be >= 1, got {cfg.lora.rank}"),
        (cfg.lora.alpha > 0, f"lora.alpha must be > 0, got {cfg.lora.alpha}"),
        (len(cfg.lora.targets) >= 1, "lora.targets must name at least one projection"),
        (len(set(cfg.lora.targets)) == len(cfg.lora.targets), f"lora.targets has duplicates: {cfg.lora.targets}"),
        (cfg.mapper.hidden >= 1, f"mapper.hidden must be >= 1, got {cfg.mapper.hidden}"),
        (len(d.train) >= 1, "data.train must list at least one source"),
        (d.num_branches >= 1, f"data.num_branches must be >= 1, got {d.num_branches}"),
        (d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}"),
        (d.max_total_tokens >= 1, f"data.max_total_tokens must be >= 1, got {d.max_total_tokens}"),
        (
            0 < d.max_live_tokens <= d.max_total_tokens,
            f"data.max_live_tokens must be in [1, data.max_total_tokens={d.max_total_tokens}], got {d.max_live_tokens}",
        ),
        (
            0 <= d.max_cache_tokens <= d.max_total_tokens,
            f"data.max_cache_tokens must be in [0, data.max_total_tokens={d.max_total_tokens}], got {d.max_cache_tokens}",
        ),
        (
            d.max_branch_slots is None or not d.buckets or d.max_branch_slots >= d.min_branches * d.buckets[0],
            f"data.max_branch_slots ({d.max_branch_slots}) admits no example: data.min_branches x the smallest "
            f"bucket is {d.min_branches * min(d.buckets, default=0)}",
        ),
        (
            len(d.buckets) >= 1 and d.buckets[0] >= 1 and all(a < b for a, b in zip(d.buckets, d.buckets[1:])),
            f"data.buckets must be positive and strictly increasing, got {list(d.buckets)}",
        ),
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (
            0 <= t.warmup_steps <= t.steps,
            f"train.warmup_steps must be in [0, train.steps={t.steps}], got {t.warmup_steps}",
        ),
        (t.clip_norm is None or t.clip_norm > 0, f"train.clip_norm must be > 0 or null, got {t.clip_norm}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (t.loss.ce_weight >= 0, f"train.loss.ce_weight must be >= 0, got {t.loss.ce_weight}"),
        (t.loss.kl_weight >= 0, f"train.loss.kl_weight must be >= 0, got {t.loss.kl_weight}"),
        (t.loss.ce_weight + t.loss.kl_weight > 0, "train.loss: ce_weight and kl_weight cannot both be 0"),
        (t.loss.kl_temperature > 0, f"train.loss.kl_temperature must be > 0, got {t.loss.kl_temperature}"),
        (cfg.checkpoint.dir != "", "checkpoint.dir must not be empty"),
        (cfg.checkpoint.every_steps >= 1, f"checkpoint.every_steps must be >= 1, got {cfg.checkpoint.every_steps}"),
        (cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}"),
        (cfg.eval_every >= 0, f"eval_every must be >= 0, got {cfg.eval_every}"),
        (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
    ]
    return [message for ok, message in checks if not ok] + _data_errors(d)


def validate_data(d: DataConfig) -> None:
    """Raise ConfigError listing every problem of a data section alone (its K range and sources)."""
    errors = _data_errors(d)
    if errors:
        raise ConfigError(errors)


def _data_errors(d: DataConfig) -> list[str]:
    errors = [] if 1 <= d.min_branches <= d.max_branches else [
        f"data.min_branches / data.max_branches must satisfy 1 <= min <= max, got {d.min_branches} / {d.max_branches}"]
    for split in ("train", "eval"):
        sources: tuple[DataSourceConfig, ...] = getattr(d, split)
        for i, source in enumerate(sources):
            errors += _source_errors(source, f"data.{split}[{i}]", d.min_branches, d.max_branches)
        if sources and all(s.weight == 0 for s in sources):
            errors.append(f"data.{split}: every source has weight 0, so stage {stage_name(d, split)!r} would have "
                          "no examples")
    return errors


def stage_name(d: DataConfig, split: str = "train") -> str:
    """How errors and the data summary name a stage: data.stage (its eval split: "<stage>/eval")."""
    base = d.stage or "train"
    return base if split == "train" else f"{base}/eval"


def _source_errors(s: DataSourceConfig, where: str, k_min: int, k_max: int) -> list[str]:
    errors = []
    if s.limit is not None and s.limit < 1:
        errors.append(f"{where}.limit must be >= 1 or null, got {s.limit}")
    if s.cap is not None and s.cap < 1:
        errors.append(f"{where}.cap must be >= 1 or null (use weight: 0 to leave a source out), got {s.cap}")
    if not s.weight >= 0:
        errors.append(f"{where}.weight must be >= 0, got {s.weight}")
    bad_k = [k for k in s.k if not k_min <= k <= k_max]
    if bad_k:
        errors.append(f"{where}.k: {bad_k} outside [data.min_branches, data.max_branches] = [{k_min}, {k_max}]")
    if s.variant is not None:
        known = sorted({v for vs in AGGREGATION_VARIANTS.values() for v in vs})
        if s.builder != "aggregation":
            errors.append(f"{where}.variant: only aggregation sources have variants, this one is {s.builder}")
        elif s.variant not in known:
            errors.append(f"{where}.variant: unknown variant {s.variant!r}; known: {', '.join(known)}")
        elif s.format in AGGREGATION_VARIANTS and s.variant not in AGGREGATION_VARIANTS[s.format]:
            known_here = ", ".join(AGGREGATION_VARIANTS[s.format])
            errors.append(f"{where}.variant: {s.format} rows have variants {known_here}, not {s.variant!r}")
    if s.task is not None and s.builder != "distillation":  # the task's name: data/sources.py check_source_tasks
        errors.append(f"{where}.task: only distillation sources read rows with an evaluation task's converter")
    return errors
