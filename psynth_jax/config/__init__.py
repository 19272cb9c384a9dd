"""Typed experiment configs: YAML files with `base:` inheritance plus `key=value` overrides.

    cfg = load_config("configs/smollm2_135m_cpu.yaml", ["train.lr=3e-4", "mesh.fsdp=4"])
    validate(cfg, num_devices=jax.device_count())   # before any compute
    mesh_shape = resolve_mesh_shape(cfg.mesh, jax.device_count())
    (run_dir / "config.yaml").write_text(dump_config(cfg))

Pure Python (PyYAML only): importing it pulls in no JAX, data or training code.
"""

from psynth_jax.config.loader import apply_override, dump_config, load_config
from psynth_jax.config.schema import (
    AxisRule,
    CheckpointConfig,
    DataConfig,
    DataSourceConfig,
    ExperimentConfig,
    HandoffConfig,
    LoraConfig,
    LossConfig,
    MapperConfig,
    MeshConfig,
    ModelSourceConfig,
    TrainConfig,
)
from psynth_jax.config.typed import ConfigError, from_dict, to_dict
from psynth_jax.config.validate import MESH_AXES, resolve_mesh_shape, validate

__all__ = [
    "AxisRule",
    "MESH_AXES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "ExperimentConfig",
    "HandoffConfig",
    "LoraConfig",
    "LossConfig",
    "MapperConfig",
    "MeshConfig",
    "ModelSourceConfig",
    "TrainConfig",
    "apply_override",
    "dump_config",
    "from_dict",
    "load_config",
    "resolve_mesh_shape",
    "to_dict",
    "validate",
]
