"""Sharding by names: logical axes on every parameter and cache array, one rules table to the mesh.

Parameters carry logical axis names in their NNX metadata (`out_sharding`, set where the
Decoder creates them; the layer stack adds "layers"), and the KV cache has fixed names
(`CACHE_AXES`). `Rules` maps each logical name to mesh axes of the (data, fsdp, tensor) mesh:

    batch -> (data, fsdp)   requests / examples: data parallel (and fsdp, which also shards weights)
    embed -> fsdp           the model dimension of weights: FSDP
    heads, kv_heads, mlp, vocab -> tensor   Megatron-style tensor parallelism
    layers, norm, head_dim, seq, cache_slots -> replicated
    lora_in, lora_rank, lora_out, mapper -> replicated (the small trained tensors and their optimizer state)

A config may override entries (MaxText's `logical_axis_rules`: `mesh.rules` in the YAML). A
name that no rule covers is an error naming the leaf, never silent replication. A dimension
the mesh axes do not divide stays unsharded (so one rules table serves 1 CPU, 8 fake devices,
a GPU node and a TPU pod); `plan()` reports where that happens.

This module decides every placement: the loader creates each parameter directly in its
`NamedSharding` (interop/loader.py), the runtime constrains activations and caches with
`constrain` when a mesh is in context (`jax.set_mesh`), and the trainer shards batches with
`batch_sharding`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = tuple[str, ...]  # () = replicated

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
    ("head_dim", ()),
    ("seq", ()),
    ("cache_slots", ()),
    ("lora_in", ()),
    ("lora_rank", ()),
    ("lora_out", ()),
    ("mapper", ()),
)
CACHE_AXES = ("layers", "batch", "cache_slots", "kv_heads", "head_dim")  # KVCache.k / .v
BRANCH_AXES = ("layers", "batch", None, "cache_slots", "kv_heads", "head_dim")  # BranchCaches.k / .v


class ShardingError(ValueError):
    """A leaf without logical axes, a logical name without a rule, or an impossible mesh."""


class Rules:
    """Logical axis name -> mesh axes; hashable, so it can live in a static graphdef."""

    def __init__(self, overrides: Mapping[str, Sequence[str] | str | None] | Iterable[tuple[str, Any]] = ()):
        table = dict(DEFAULT_RULES)
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        for name, axes in items:
            table[name] = _as_axes(axes, name)
        self._table = tuple(sorted(table.items()))

    def __hash__(self) -> int:
        return hash(self._table)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rules) and other._table == self._table

    def __repr__(self) -> str:
        return f"Rules({dict(self._table)})"

    def axes(self, name: str, where: str) -> MeshAxes:
        """The mesh axes of logical `name` (ShardingError naming `where` when no rule covers it)."""
        table = dict(self._table)
        if name not in table:
            raise ShardingError(f"{where}: logical axis {name!r} has no sharding rule (rules cover "
                                f"{', '.join(sorted(table))}); add one to mesh.rules")
        return table[name]

    def spec(self, logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
             where: str = "array") -> P:
        """PartitionSpec for an array of `shape` with `logical` axis names on `mesh`.

        A dimension is split over the longest prefix of its mesh axes whose sizes divide it and
        that no earlier dimension uses (e.g. 2 requests on data=2 x fsdp=2: over data only); with
        none, it stays unsharded.
        """
        if len(logical) != len(shape):
            raise ShardingError(f"{where}: {len(logical)} logical axes {tuple(logical)} for a {len(shape)}-d array")
        out, used = [], set()
        for name, size in zip(logical, shape):
            axes = [] if name is None else [a for a in self.axes(name, where) if a in mesh.shape and a not in used]
            while axes and size % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
            axes = [a for a in axes if mesh.shape[a] > 1] if math.prod(mesh.shape[a] for a in axes) > 1 else []
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
            used.update(axes)
        return P(*out)


def _as_axes(axes: Sequence[str] | str | None, name: str) -> MeshAxes:
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
        raise ShardingError(f"mesh.rules: {name!r} maps to unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
    return axes


def make_mesh(shape: tuple[int, int, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices, every process's)."""
    devices = list(devices) if devices is not None else jax.devices()
    n = int(np.prod(shape))
    if n != len(devices):
        raise ShardingError(f"impossible mesh: data*fsdp*tensor={n} but {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def mesh_of(sizes: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh of `sizes` (at most one -1: the devices left) over the first
    devices it needs (default pool: all devices), e.g. (1, 1, 1) = one device of many."""
    pool = list(devices) if devices is not None else jax.devices()
    sizes = tuple(int(x) for x in sizes)
    if len(sizes) != 3 or any(x == 0 or x < -1 for x in sizes) or sizes.count(-1) > 1:
        raise ShardingError(f"mesh sizes {sizes}: need three positive sizes for {MESH_AXES}, at most one -1")
    fixed = math.prod(x for x in sizes if x != -1)
    if -1 in sizes:
        if len(pool) % fixed:
            raise ShardingError(f"impossible mesh {sizes}: {fixed} does not divide {len(pool)} devices")
        sizes = tuple(len(pool) // fixed if x == -1 else x for x in sizes)
    if fixed > len(pool):
        raise ShardingError(f"impossible mesh {sizes}: needs {fixed} devices, {len(pool)} available")
    return make_mesh(sizes, pool[: math.prod(sizes)])  # type: ignore[arg-type]


def single_device_mesh(device: Any | None = None) -> Mesh:
    """The 1 x 1 x 1 mesh of one device (default: the first local one)."""
    return make_mesh((1, 1, 1), [device if device is not None else jax.local_devices()[0]])


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def logical_axes(variable: Any, where: str) -> tuple[str, ...]:
    """The logical axis names an NNX variable was created with (ShardingError when it has none)."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding")
    if names is None:
        raise ShardingError(f"{where} has no logical axis names: every parameter must be created with "
                            "logical axis names (model/transformer.py: param)")
    return tuple(names)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """A NamedSharding per leaf of an NNX state (abstract or concrete), from its logical axes."""
    def one(path: tuple, variable: Any) -> Any:
        where = _path_name(path)
        names = logical_axes(variable, where)
        shape = tuple(variable.get_value().shape) if hasattr(variable, "get_value") else tuple(variable.shape)
        return variable.replace(NamedSharding(mesh, rules.spec(names, shape, mesh, where)))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    """Arrays whose leading dimension is the batch: split over the batch rule, the rest whole."""
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, "batch array"))


def constrain(x: jax.Array, logical: Sequence[str | None], rules: Rules) -> jax.Array:
    """with_sharding_constraint by logical names under the context mesh; a no-op without one.

    Called inside jitted functions: the mesh comes from `jax.set_mesh(mesh)` around the call.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(logical, x.shape, mesh)))


def target_platform() -> str:
    """The platform the code being traced will run on: that of the context mesh's devices
    (`jax.sharding.get_abstract_mesh().abstract_device`, set by `jax.set_mesh` or
    `jax.sharding.use_abstract_mesh`), else the default backend's.

    They differ when a program is compiled ahead of time for devices this host does not have: a
    mesh over a TPU topology's devices on a CPU host (`psynth plan`, the Mosaic lowering test)
    is "tpu" although `jax.default_backend()` is "cpu". Kernels that lower differently per
    platform (splash: Mosaic on TPU, the Pallas interpreter elsewhere) must ask this.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes each device holds of a pytree of placed arrays (from `addressable_shards`)."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def sharded_bytes(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array of `shape` placed with `sharding` (its largest shard)."""
    shard = sharding.shard_shape(tuple(shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(dtype).itemsize
