"""The XLA attention path: the chunk over the cache as it was plus itself, and the dense reference.

`xla_attention` never writes or copies the layer cache first: the post-write mask is split into
the cache's keys outside the chunk's slots and the chunk's own keys (`split_slots`), each a key
block of the blockwise kernel (flash.py) or of the one-pass decode reduction. `dense_attention`,
the masked float32 softmax over a cache that already holds the chunk, is the reference every
path is tested against and serves explicit masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psynth_jax.model.kernels.flash import NEG, KeyBlock, flash_attention
from psynth_jax.model.kv_cache import AttentionMask, write_rows


def xla_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    mask: AttentionMask,
    chunk: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    stacked: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    view: KeyBlock | None = None,
) -> jax.Array:
    """The XLA path: the chunk's attention over the cache as it was plus the chunk itself.

    Neither the layer cache nor the chunk is written or copied first: writing into a slice of
    the stacked [L,B,S,...] cache inside the layer scan makes XLA copy the layer's whole cache
    (slice, scatter, write-back) on every layer. The post-write mask is split in two instead
    (`split_slots`): keys of the cache as it was outside the chunk's slots, and the chunk's own
    keys at its slots; a zero-copy branch view adds a third block.
    - T > 1 (prefill, extend): blockwise attention with an online softmax (flash.py) over the
      key blocks: memory O(T x tile), not O(T x S), also under jax.grad. With `stacked` (the
      layer scan's whole cache and this layer's index) the cache tiles are read from the stack
      in place: the scan's per-layer slice k/v then only carries gradients, and XLA drops it
      instead of copying the layer cache for the tile loop.
    - T == 1 (decode): one pass of multiply-reduces over the cache and the token's own key
      (`decode_attention`); over a branch view too, the tile loop of flash.py, which reads the
      worker rows from the stack in place (XLA would copy a layer of them for the reduce).
    - explicit masks (reference layouts of tests): the chunk is written into a copy of the
      cache and the dense reference runs on it.
    """
    k_chunk, v_chunk, start, _ = chunk
    if mask.explicit is not None:
        if view is not None:
            raise ValueError("an explicit attention mask cannot be combined with a zero-copy branch view")
        return dense_attention(q, write_rows(k_cache, k_chunk, start), write_rows(v_cache, v_chunk, start), mask)
    blocks = cache_blocks(q, k_cache, v_cache, k_chunk, v_chunk, mask, start, stacked)
    if view is not None:
        blocks = (view,) + blocks
    scale = q.shape[-1] ** -0.5
    if q.shape[1] == 1 and view is None:
        return decode_attention(blocks, mask.q_slots, scale=scale)
    return flash_attention(blocks, mask.q_slots, scale=scale)


def decode_attention(blocks: tuple[KeyBlock, ...], q_slot: jax.Array, *, scale: float) -> jax.Array:
    """One query per row over every block's keys, as multiply-reduces -> [B, 1, Hq, D].

    Reads each block's k/v [B,N,S,Hkv,D] in its own layout (a dot would first copy the cache
    into a transposed one) in one pass: a decode step is bound by reading the cache. Blocks
    without score bias or value affine (the cache and the chunk); a row that sees no key
    returns zeros.
    """
    b, _, _, hq, d = blocks[0].q.shape
    hkv = blocks[0].k.shape[3]
    g = hq // hkv
    f32 = jnp.float32
    logits, visible = [], []
    for blk in blocks:
        n = blk.k.shape[1]
        qb = blk.q[:, :, 0].reshape(b, n, 1, hkv, g, d).astype(f32) * scale  # [B,N,1,Hkv,G,D]
        lg = jnp.sum(qb * blk.k[:, :, :, :, None, :].astype(f32), axis=-1)  # [B,N,S,Hkv,G]
        vis = (blk.valid & (blk.slot <= q_slot[:, :1, None]))[..., None, None]  # [B,N,S,1,1]
        logits.append(jnp.where(vis, lg, NEG))
        visible.append(vis)
    m = jnp.max(jnp.stack([lg.max(axis=(1, 2)) for lg in logits]), axis=0)  # [B,Hkv,G]
    denom, out = 0.0, 0.0
    for blk, lg, vis in zip(blocks, logits, visible):
        p = jnp.where(vis, jnp.exp(lg - m[:, None, None]), 0.0)  # [B,N,S,Hkv,G]
        o = jnp.sum(p[..., None] * blk.v[:, :, :, :, None, :].astype(f32), axis=2)  # [B,N,Hkv,G,D]
        denom = denom + p.sum(axis=(1, 2))
        out = out + o.sum(axis=1)
    out = jnp.where(denom[..., None] > 0, out / jnp.maximum(denom, 1e-30)[..., None], 0.0)
    return out.reshape(b, 1, hq, d).astype(blocks[0].q.dtype)


def cache_blocks(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_chunk: jax.Array, v_chunk: jax.Array,
                 mask: AttentionMask, start: jax.Array,
                 stacked: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> tuple[KeyBlock, KeyBlock]:
    """The slot-rule mask over [cache as it was | chunk] as two flash key blocks (no copy of either)."""
    (cache_slot, cache_valid), (chunk_slot, chunk_valid) = split_slots(mask.kv_valid, start, k_chunk.shape[1])
    qn = q[:, None]
    src = {}
    if stacked is not None:
        k_stack, v_stack, layer = stacked
        src = dict(k_src=k_stack, v_src=v_stack, layer=layer)
    return (KeyBlock(qn, k_cache[:, None], v_cache[:, None], cache_slot[:, None], cache_valid[:, None], **src),
            KeyBlock(qn, k_chunk[:, None], v_chunk[:, None], chunk_slot[:, None], chunk_valid[:, None]))


def split_slots(kv_valid: jax.Array, start: jax.Array, t: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Post-write validity [B,S] -> ((slots, valid) of the cache as it was, (slots, valid) of the chunk).

    The chunk lands at slots [w, w + T), w = clip(start, 0, S - T) (dynamic_update_slice's
    clamp), so those slots show the chunk's keys, not what the cache held there before. With
    the query slots of the mask, key slot <= query slot then gives exactly `mask.dense()`.
    """
    b, s = kv_valid.shape
    w = jnp.clip(start.astype(jnp.int32), 0, s - t)[:, None]  # [B, 1]
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    outside = (slots < w) | (slots >= w + t)
    chunk_slot = w + jnp.arange(t, dtype=jnp.int32)[None, :]
    return (slots, kv_valid & outside), (chunk_slot, jnp.take_along_axis(kv_valid, chunk_slot, axis=1))


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Masked softmax attention over k/v as given, in float32: the reference every path is tested against."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d**-0.5)
    visible = mask.dense()[:, None, None, :, :]  # [B,1,1,T,S]
    logits = jnp.where(visible, logits, NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
