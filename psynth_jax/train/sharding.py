"""Sharding by names: logical axes per parameter, a rules table mapping them to mesh axes.

The mesh has axes (data, fsdp, tensor). The frozen backbone is sharded FSDP-style over `fsdp`
(the model dimension) and Megatron-style over `tensor` (heads / MLP / vocab); the batch is split
over (data, fsdp). The small trainable adapters (LoRA, mapper) are replicated. A dimension that
a mesh axis does not divide is left unsharded, so the same rules run on 1 CPU, 8 fake CPU
devices, a GPU node or a TPU pod.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); None = replicated
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
}

# backbone leaf (path inside the NNX state, "layers/..." for stacked layers) -> logical axes
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm/scale": ("norm",),
    "layers/attn_norm/scale": ("layers", "norm"),
    "layers/mlp_norm/scale": ("layers", "norm"),
    "layers/q_norm/scale": ("layers", "norm"),
    "layers/k_norm/scale": ("layers", "norm"),
    "layers/q/kernel": ("layers", "embed", "heads"),
    "layers/k/kernel": ("layers", "embed", "kv_heads"),
    "layers/v/kernel": ("layers", "embed", "kv_heads"),
    "layers/o/kernel": ("layers", "heads", "embed"),
    "layers/q/bias": ("layers", "heads"),
    "layers/k/bias": ("layers", "kv_heads"),
    "layers/v/bias": ("layers", "kv_heads"),
    "layers/o/bias": ("layers", "embed"),
    "layers/gate/kernel": ("layers", "embed", "mlp"),
    "layers/up/kernel": ("layers", "embed", "mlp"),
    "layers/down/kernel": ("layers", "mlp", "embed"),
}


def make_mesh(shape: tuple[int, int, int], devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all)."""
    devices = devices if devices is not None else jax.devices()
    n = int(np.prod(shape))
    if n != len(devices):
        raise ValueError(f"impossible mesh: data*fsdp*tensor={n} but {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh: Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec from logical axes; dims a mesh axis does not divide stay unsharded."""
    out = []
    for name, size in zip(logical, shape):
        axis = LOGICAL_RULES.get(name) if name else None
        out.append(axis if axis is not None and size % _axis_size(mesh, axis) == 0 else None)
    return P(*out)


def _path_key(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def backbone_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a backbone state pytree (LoRA / unknown leaves replicated)."""

    def one(path, leaf):
        key = _path_key(path)
        if key.endswith("/value"):
            key = key[: -len("/value")]
        logical = PARAM_AXES.get(key)
        if logical is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(logical, leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_shardings(batch: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Split every batch array over (data, fsdp) on its leading (example) dimension."""
    return {
        k: NamedSharding(mesh, spec_for(("batch",) + (None,) * (np.ndim(v) - 1), np.shape(v), mesh))
        for k, v in batch.items()
    }
