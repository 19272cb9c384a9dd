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
    """One query per row over every block's keys, as two matmuls per block -> [B, 1, Hq, D].

    Reads each block's k/v [B,N,S,Hkv,D] in its own layout, as a [B*N, S, Hkv*D] matrix (a
    reshape, no copy): the logits of all Hq query heads are one matmul of it with a block-diagonal
    query matrix [Hq, Hkv*D] (query head (h, g) holds q at key head h's D columns, zeros
    elsewhere), and the outputs one matmul of the probabilities [Hq, S] with the value matrix, of
    which each head keeps its own key head's D columns. The zeros cost Hkv x the multiply-adds
    of a per-head product, which a decode step can spare: it is bound by reading the cache, and a
    per-head product would first copy the cache into a head-major layout, or (as multiply-reduces
    over a [B,S,Hkv,G,D] broadcast) run 8x slower at 16 rows x 1,024 slots on XLA:CPU.
    Blocks without score bias or value affine (the cache and the chunk); a row that sees no key
    returns zeros.
    """
    b, _, _, hq, d = blocks[0].q.shape
    hkv = blocks[0].k.shape[3]
    g = hq // hkv
    f32 = jnp.float32
    diag = jnp.eye(hkv, dtype=f32)
    logits, visible, values = [], [], []
    for blk in blocks:
        n, s = blk.k.shape[1], blk.k.shape[2]
        q = blk.q[:, :, 0].reshape(b * n, hkv, g, d).astype(f32) * scale
        q = jnp.einsum("rhgd,hj->rhgjd", q, diag).reshape(b * n, hq, hkv * d)  # block-diagonal queries
        lg = jnp.einsum("rqi,rsi->rqs", q, blk.k.reshape(b * n, s, hkv * d).astype(f32))  # [B*N, Hq, S]
        vis = (blk.valid & (blk.slot <= q_slot[:, :1, None])).reshape(b * n, 1, s)
        logits.append(jnp.where(vis, lg, NEG))
        visible.append(vis)
        values.append(blk.v.reshape(b * n, s, hkv * d).astype(f32))
    m = jnp.max(jnp.stack([lg.reshape(b, -1, hq, lg.shape[-1]).max(axis=(1, 3)) for lg in logits]), axis=0)  # [B,Hq]
    denom, out = 0.0, 0.0
    for lg, vis, val in zip(logits, visible, values):
        n = lg.shape[0] // b
        p = jnp.where(vis, jnp.exp(lg - jnp.repeat(m, n, axis=0)[:, :, None]), 0.0)  # [B*N, Hq, S]
        o = jnp.einsum("rqs,rsi->rqi", p, val).reshape(b, n, hkv, g, hkv, d)  # every head x every key head
        denom = denom + p.sum(axis=2).reshape(b, n, hq).sum(axis=1)
        out = out + jnp.einsum("bnhgjd,hj->bhgd", o, diag).reshape(b, hq, d)  # each head's own key head
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
