"""Fused-kernel attention for the cache layouts, as sequence lengths and offsets (no dense mask).

Every cache this project builds keeps its valid slots contiguous: `valid[b, s] == (s < end[b])`
(padding only ever sits at the end of a chunk, and the next write starts at `end`). A chunk of T
new tokens written at slot `start` therefore sees (a) every cached key before `start`, unmasked,
and (b) its own keys causally. Fused kernels cannot express "(a) + (b)" in one call (cuDNN's
causal mask aligns top-left when queries < keys), so the attention is split into those two calls
and merged exactly by their log-sum-exp:

    out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b})

`kernel` picks jax.nn.dot_product_attention's implementation: "cudnn" on GPU, "xla" to check the
algebra on any platform (the tests compare it with the dense reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    start: jax.Array,
    chunk_len: jax.Array,
    *,
    kernel: str = "cudnn",
) -> jax.Array:
    """q/k_chunk/v_chunk [B,T,H*,D]; caches [B,S,Hkv,D] (keys before `start` [B] are visible);
    chunk_len [B]: valid tokens of the chunk. Returns [B,T,Hq,D] in q's dtype."""
    out_a, lse_a = jax.nn.dot_product_attention(
        q, k_cache, v_cache, key_value_seq_lengths=start, return_residual=True, implementation=kernel
    )
    out_b, lse_b = jax.nn.dot_product_attention(
        q, k_chunk, v_chunk, is_causal=True, query_seq_lengths=jnp.maximum(chunk_len, 1),
        key_value_seq_lengths=jnp.maximum(chunk_len, 1), return_residual=True, implementation=kernel,
    )
    lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)  # [B, T, H]
    m = jnp.maximum(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    has_prefix = (start > 0)[:, None, None]
    wa = jnp.where(has_prefix, wa, 0.0)  # an empty prefix contributes nothing
    out = (wa[..., None] * out_a.astype(jnp.float32) + wb[..., None] * out_b.astype(jnp.float32)) / (
        wa + wb
    )[..., None]
    return out.astype(q.dtype)
