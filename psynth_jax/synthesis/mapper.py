"""Cache mappers: learned affine maps applied to re-encoded branch keys and values.

`AffineLengthMapper` is the release's length-aware mapper exactly (METHOD.md section 2): one MLP
shared by all layers and branches, Linear(3 -> 32), SiLU, Linear(32 -> 4), inputs
[log1p(max(L_i, 1)), log1p(max(K, 1)), l / (num_layers - 1)], outputs bounded by tanh into
(alpha_k, beta_k, alpha_v, beta_v), last layer zero-initialised so it starts as the identity.

The release's ablations drop runtime inputs (`metadata_features`: "both" = the three above,
"length" = [length, layer], "num_agents" = [K, layer], "none" = [layer]); the mapper keeps the
mode and selects those columns, so an ablation checkpoint runs unchanged.

`PerHeadAffineMapper` is ours: the same inputs, but one (alpha, beta) pair per KV head for keys
and for values, so heads that carry position-like versus content-like signal can be rescaled
differently. Also identity at init.

Mappers are NNX modules holding `MapperParam`s; `map_caches` is the pure function the jitted
paths call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.model.transformer import param

MAPPER_KINDS = ("affine_length", "per_head_affine")
# the release's `metadata_features` modes -> which columns of `mapper_features` the MLP reads
METADATA_FEATURES: dict[str, tuple[int, ...]] = {"both": (0, 1, 2), "length": (0, 2), "num_agents": (1, 2),
                                                 "none": (2,)}


class MapperParam(nnx.Param):
    """A trainable cache-mapper weight."""


class _MLP(nnx.Module):
    """Linear(inputs -> hidden), SiLU, Linear(hidden -> out) with the last layer zero-initialised."""

    def __init__(self, hidden: int, out: int, rngs: nnx.Rngs, inputs: int = 3):
        # torch.nn.Linear's default init (kaiming-uniform, bound 1/sqrt(fan_in)) for the first layer
        bound = 1.0 / jnp.sqrt(float(inputs))
        uniform = jax.random.uniform
        self.w0 = param(uniform(rngs.params(), (inputs, hidden), jnp.float32, -bound, bound), ("mapper", "mapper"),
                        MapperParam)
        self.b0 = param(uniform(rngs.params(), (hidden,), jnp.float32, -bound, bound), ("mapper",), MapperParam)
        self.w1 = param(jnp.zeros((hidden, out), jnp.float32), ("mapper", "mapper"), MapperParam)
        self.b1 = param(jnp.zeros((out,), jnp.float32), ("mapper",), MapperParam)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(x @ self.w0[...] + self.b0[...]) @ self.w1[...] + self.b1[...]


def mapper_features(lengths: jax.Array, num_branches: int, num_layers: int) -> jax.Array:
    """Inputs [num_layers, *lengths.shape, 3] for branch lengths L_i (any leading shape)."""
    lf = jnp.log1p(jnp.maximum(lengths, 1).astype(jnp.float32))
    kf = jnp.full_like(lf, jnp.log1p(float(max(num_branches, 1))))
    layer = jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)
    shape = (num_layers,) + lengths.shape
    return jnp.stack(
        [jnp.broadcast_to(lf, shape), jnp.broadcast_to(kf, shape),
         jnp.broadcast_to(layer.reshape((num_layers,) + (1,) * lengths.ndim), shape)],
        axis=-1,
    )


class AffineLengthMapper(nnx.Module):
    """The release's mapper: one scalar (alpha, beta) for keys and for values per (layer, branch)."""

    kind = "affine_length"

    def __init__(self, num_kv_heads: int, hidden: int = 32, *, metadata_features: str = "both", rngs: nnx.Rngs):
        if metadata_features not in METADATA_FEATURES:
            raise ValueError(f"unknown mapper metadata_features {metadata_features!r}; "
                             f"choose one of {tuple(METADATA_FEATURES)}")
        self.metadata_features = metadata_features
        self.net = _MLP(hidden, 4, rngs, inputs=len(METADATA_FEATURES[metadata_features]))

    def scales(self, feats: jax.Array) -> tuple[jax.Array, ...]:
        """feats [..., 3] -> alpha_k, beta_k, alpha_v, beta_v, each [..., 1] (broadcast over heads)."""
        if self.metadata_features != "both":
            feats = feats[..., list(METADATA_FEATURES[self.metadata_features])]
        r = self.net(feats)
        t = 0.1 * jnp.tanh(r)
        return 1.0 + t[..., 0:1], t[..., 1:2], 1.0 + t[..., 2:3], t[..., 3:4]


class PerHeadAffineMapper(nnx.Module):
    """Ours: a (alpha, beta) pair per KV head, for keys and values; identity at init."""

    kind = "per_head_affine"

    def __init__(self, num_kv_heads: int, hidden: int = 32, *, rngs: nnx.Rngs):
        self.num_kv_heads = num_kv_heads
        self.net = _MLP(hidden, 4 * num_kv_heads, rngs)

    def scales(self, feats: jax.Array) -> tuple[jax.Array, ...]:
        r = self.net(feats).reshape(feats.shape[:-1] + (4, self.num_kv_heads))
        t = 0.1 * jnp.tanh(r)
        return 1.0 + t[..., 0, :], t[..., 1, :], 1.0 + t[..., 2, :], t[..., 3, :]


Mapper = AffineLengthMapper | PerHeadAffineMapper


def make_mapper(kind: str, num_kv_heads: int, hidden: int = 32, seed: int = 0, *,
                metadata_features: str = "both") -> Mapper:
    """Build a mapper by config name (`metadata_features`: the release's input ablations, affine_length only)."""
    classes = {"affine_length": AffineLengthMapper, "per_head_affine": PerHeadAffineMapper}
    if kind not in classes:
        raise ValueError(f"unknown mapper kind {kind!r}; choose one of {MAPPER_KINDS}")
    if kind == "affine_length":
        return AffineLengthMapper(num_kv_heads, hidden, metadata_features=metadata_features, rngs=nnx.Rngs(seed))
    if metadata_features != "both":
        raise ValueError(f"metadata_features={metadata_features!r} exists for the release's affine_length mapper only")
    return classes[kind](num_kv_heads, hidden, rngs=nnx.Rngs(seed))


def affine_scalars(mapper: Mapper, lengths: jax.Array, num_layers: int) -> tuple[jax.Array, ...]:
    """(alpha_k, beta_k, alpha_v, beta_v), each [layers, B, K, 1 or H], for branch lengths [B, K].

    What both cache paths apply: `map_caches` to the branch K/V themselves, the zero-copy path
    (core.prepare of a BranchView) inside the synthesizer's attention.
    """
    return mapper.scales(mapper_features(lengths, lengths.shape[-1], num_layers))


def map_caches(mapper: Mapper, k: jax.Array, v: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Apply the mapper to branch caches k/v [layers, B, K, L, H, D] with lengths [B, K].

    K' = alpha_k * K + beta_k and V' = alpha_v * V + beta_v per (layer, request, branch)
    (per head for per-head mappers), broadcast over tokens and channels. Computed in float32,
    returned in the cache dtype.
    """
    ak, bk, av, bv = affine_scalars(mapper, lengths, k.shape[0])  # each [layers, B, K, 1 or H]

    def affine(x, a, b):
        a = a[:, :, :, None, :, None]  # -> [layers, B, K, 1, H|1, 1]
        b = b[:, :, :, None, :, None]
        return (a * x.astype(jnp.float32) + b).astype(x.dtype)

    return affine(k, ak, bk), affine(v, av, bv)
