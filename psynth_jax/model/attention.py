"""One attention entry point with an explicit mask description.

`AttentionMask` describes visibility by slots (see kv_cache.py): query t of row b sits at slot
`q_slots[b, t]` and sees key slot s iff `kv_valid[b, s]` and `s <= q_slots[b, t]`. Causal
prompts, right-padding, decode steps and the Parallel-Synthesis "all branch tokens + causal
prompt" layout are all instances of this one rule. Layouts outside it (e.g. several branches
with their worker prompts in one sequence, block-diagonal, used as the from-scratch reference
of the cache handoff) pass an `explicit` boolean mask, which only the XLA path accepts.

Implementations:
- "xla": masked softmax in float32. Handles every mask. `dense_attention` (over a cache that
  already holds the chunk) is the reference in tests; a decode step reads the cache as it was
  plus its own key instead, which keeps XLA from copying the layer cache (`xla_attention`).
- "cudnn": cuDNN flash attention on GPU, with the layout given as sequence lengths and offsets
  (attention_kernels.split_attention). Needs the chunk's own keys/values and the contiguous
  cache invariant of kv_cache.py; refuses explicit masks rather than silently ignoring them.
- "xla_split": the same split layout run by XLA's kernel: checks the cuDNN path's algebra on
  any platform (CPU tests), and is a fallback where cuDNN refuses a shape.
- "splash": jax's TPU splash-attention Pallas kernel over [cache prefix | causal chunk] in one
  call, the per-row prefix and chunk lengths given as segment ids (splash.py). Same cache
  layouts and the same refusal of explicit masks as "cudnn"; off TPU it runs in Pallas
  interpret mode (a slow correctness check). Imported lazily: pallas is only loaded when chosen.
  Under a multi-device context mesh (`jax.set_mesh`, or the train/eval steps, which trace with
  their mesh in context) the kernel runs inside a shard_map over it, batch over (data, fsdp) and
  heads over tensor, since jit cannot partition a Mosaic kernel; checked in interpret mode on
  fake CPU devices only, never on a TPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from psynth_jax.model.flash import KeyBlock, flash_attention
from psynth_jax.model.kv_cache import write_rows

IMPLEMENTATIONS = ("xla", "cudnn", "xla_split", "splash")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
    q_slots: jax.Array  # [B, T] int32
    kv_valid: jax.Array  # [B, S] bool
    explicit: jax.Array | None = None  # [B, T, S] bool: replaces the slot rule (XLA only)

    def dense(self) -> jax.Array:
        """Boolean [B, T, S] visibility."""
        if self.explicit is not None:
            return self.explicit
        s = jnp.arange(self.kv_valid.shape[1], dtype=jnp.int32)
        return self.kv_valid[:, None, :] & (s[None, None, :] <= self.q_slots[:, :, None])


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    impl: str = "xla",
    chunk: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    stacked: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Grouped-query attention. q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D].

    k/v are the layer's cache *before* the chunk is written; chunk = (k_chunk, v_chunk, start,
    chunk_len): the new tokens' own keys/values [B,T,Hkv,D], the slot each row's chunk is
    written at (kv_cache.write_rows) and how many of its tokens are valid. `mask` describes the
    slot space *after* the write. Reading the cache as it was, rather than a written copy, is
    what keeps a decode step from copying a whole layer cache (see `xla_attention`). Query rows
    that see no key at all (padding) return zeros in the XLA path, and finite values without
    meaning in "splash". chunk=None: k/v already hold the chunk (the dense reference, XLA only).
    stacked = (k_stack, v_stack, layer): the whole stacked cache [L,B,S,Hkv,D] that k/v are
    layer `layer` of; the XLA path then reads it in place (see `xla_attention`).
    """
    if impl == "xla":
        if chunk is None:
            return dense_attention(q, k, v, mask)
        return xla_attention(q, k, v, mask, chunk, stacked)
    if impl in ("cudnn", "xla_split", "splash"):
        if mask.explicit is not None or chunk is None:
            raise ValueError(f"attention {impl!r} takes cache layouts only (no explicit mask); use impl='xla'")
        k_chunk, v_chunk, start, chunk_len = chunk
        if impl == "splash":
            from psynth_jax.model.splash import splash_attention

            return splash_attention(q, k, v, k_chunk, v_chunk, start, chunk_len)
        from psynth_jax.model.attention_kernels import split_attention

        kernel = "cudnn" if impl == "cudnn" else "xla"
        return split_attention(q, k, v, k_chunk, v_chunk, start, chunk_len, kernel=kernel)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def xla_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    mask: AttentionMask,
    chunk: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    stacked: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The XLA path: the chunk's attention over the cache as it was plus the chunk itself.

    Neither the layer cache nor the chunk is written or copied first: writing into a slice of
    the stacked [L,B,S,...] cache inside the layer scan makes XLA copy the layer's whole cache
    (slice, scatter, write-back) on every layer. The post-write mask is split in two instead
    (`split_mask` / `split_slots`): keys of the cache as it was outside the chunk's slots, and
    the chunk's own keys at its slots.
    - T > 1 (prefill, extend): blockwise attention with an online softmax (flash.py) over the
      two key blocks: memory O(T x tile), not O(T x S), also under jax.grad. With `stacked`
      (the layer scan's whole cache and this layer's index) the cache tiles are read from the
      stack in place: the scan's per-layer slice k/v then only carries gradients, and XLA
      drops it instead of copying the layer cache for the tile loop.
    - T == 1 (decode): one pass of multiply-reduces over the cache in its own layout.
    - explicit masks (reference layouts of tests) with T > 1: the chunk is written into a copy
      of the cache and the dense reference runs on it.
    """
    k_chunk, v_chunk, start, _ = chunk
    if q.shape[1] > 1:
        if mask.explicit is not None:
            return dense_attention(q, write_rows(k_cache, k_chunk, start), write_rows(v_cache, v_chunk, start), mask)
        blocks = cache_blocks(q, k_cache, v_cache, k_chunk, v_chunk, mask, start, stacked)
        return flash_attention(blocks, mask.q_slots, scale=q.shape[-1] ** -0.5)
    vis_cache, vis_chunk = split_mask(mask.dense(), start, k_cache.shape[1], k_chunk.shape[1])
    b, _, hq, d = q.shape
    hkv = k_cache.shape[2]
    qg = q[:, 0].reshape(b, 1, hkv, hq // hkv, d).astype(jnp.float32) * (d**-0.5)  # [B,1,K,G,D]
    # multiply-reduce, not einsum: reads the cache in its [B,S,K,D] layout (a dot would first
    # copy it into a transposed one)
    la = jnp.sum(qg * k_cache[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [B,S,K,G]
    lb = jnp.sum(qg * k_chunk[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [B,1,K,G]
    va = vis_cache[:, 0, :, None, None]
    vb = vis_chunk[:, 0, :, None, None]
    la = jnp.where(va, la, _MASK_VALUE)
    lb = jnp.where(vb, lb, _MASK_VALUE)
    m = jnp.maximum(la.max(axis=1, keepdims=True), lb.max(axis=1, keepdims=True))
    pa = jnp.where(va, jnp.exp(la - m), 0.0)
    pb = jnp.where(vb, jnp.exp(lb - m), 0.0)
    denom = pa.sum(axis=1) + pb.sum(axis=1)  # [B,K,G]
    oa = jnp.sum(pa[..., None] * v_cache[:, :, :, None, :].astype(jnp.float32), axis=1)  # [B,K,G,D]
    ob = jnp.sum(pb[..., None] * v_chunk[:, :, :, None, :].astype(jnp.float32), axis=1)
    out = jnp.where(denom[..., None] > 0, (oa + ob) / jnp.maximum(denom, 1e-30)[..., None], 0.0)
    return out.reshape(b, 1, hq, d).astype(q.dtype)


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


def split_mask(full: jax.Array, start: jax.Array, num_slots: int, t: int) -> tuple[jax.Array, jax.Array]:
    """A post-write visibility [B,T,S] -> (over the cache as it was [B,T,S], over the chunk [B,T,T]).

    The chunk lands at slots [w, w + T), w = clip(start, 0, S - T) (dynamic_update_slice's
    clamp): those slots show the chunk's keys, not what the cache held there before.
    """
    w = jnp.clip(start.astype(jnp.int32), 0, num_slots - t)[:, None]  # [B, 1]
    s = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    outside = (s < w) | (s >= w + t)  # [B, S]
    chunk_slots = jnp.broadcast_to((w + jnp.arange(t, dtype=jnp.int32)[None, :])[:, None, :], full.shape[:2] + (t,))
    return full & outside[:, None, :], jnp.take_along_axis(full, chunk_slots, axis=2)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Masked softmax attention over k/v as given, in float32: the reference every path is tested against."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d**-0.5)
    visible = mask.dense()[:, None, None, :, :]  # [B,1,1,T,S]
    logits = jnp.where(visible, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
