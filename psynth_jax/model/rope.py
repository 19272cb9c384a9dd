"""Rotary position embeddings (RoPE), in transformers' rotate-half convention.

RoPE is a rotation per frequency pair, so rotating an already-embedded key by the angle of a
position delta is exact: `apply_rope(apply_rope(k, p), -P) == apply_rope(k, p - P)` up to float
rounding. Parallel-Synthesis re-encodes branch keys this way (`shift_keys`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], float32, with the config's rope scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_llama = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_llama / rs.factor + smooth * inv_llama
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(is_medium, smoothed, inv_llama).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [..., T, H, D] to `positions` [..., T] (any integer, negative allowed).

    Angles and the rotation are computed in float32; the result has x's dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, D/2]
    cos = jnp.cos(angles)[..., None, :]  # broadcast over heads
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def shift_keys(keys: jax.Array, delta: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Move RoPE-embedded keys [..., T, H, D] by `delta` positions ([...] or [..., T]).

    Exact re-encoding: a key embedded at position p becomes the key embedded at p + delta.
    Parallel-Synthesis calls this with delta = -P_i to move branch i to start at 0.
    """
    delta = jnp.asarray(delta)
    if delta.ndim == keys.ndim - 3:  # one delta per row: broadcast over tokens
        delta = jnp.broadcast_to(delta[..., None], keys.shape[:-2])
    return apply_rope(keys, delta, inv_freq)
