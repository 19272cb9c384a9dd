"""One attention entry point with an explicit mask description.

`AttentionMask` describes visibility by slots (see kv_cache.py): query t of row b sits at slot
`q_slots[b, t]` and sees key slot s iff `kv_valid[b, s]` and `s <= q_slots[b, t]`. Causal
prompts, right-padding, decode steps and the Parallel-Synthesis "all branch tokens + causal
prompt" layout are all instances of this one rule. Layouts outside it (e.g. several branches
with their worker prompts in one sequence, block-diagonal, used as the from-scratch reference
of the cache handoff) pass an `explicit` boolean mask, which only the XLA path accepts.

Implementations:
- "xla": float32 softmax over the cache as it was plus the chunk's own keys, never a written
  copy of the layer cache (`xla_attention`): blockwise with an online softmax for prefill and
  extend (flash.py), one multiply-reduce pass for a decode step. The only implementation that
  reads a zero-copy branch view (`view_block`). `dense_attention`, the masked softmax over a
  cache that already holds the chunk, is the reference in tests and serves explicit masks.
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
import functools

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.model.flash import KeyBlock, flash_attention
from psynth_jax.model.kv_cache import write_rows
from psynth_jax.model.rope import apply_rope

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
    view: KeyBlock | None = None,
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
    view: the zero-copy branch view's key block (`view_block`), seen by every query besides
    the cache and the chunk; the XLA path only.
    """
    if impl == "xla":
        if chunk is None:
            return dense_attention(q, k, v, mask)
        return xla_attention(q, k, v, mask, chunk, stacked, view)
    if view is not None:
        raise ValueError(f"attention {impl!r} cannot read a zero-copy branch view; use impl='xla' "
                         "(or the materialised cache path)")
    if impl in ("cudnn", "xla_split", "splash"):
        if mask.explicit is not None or chunk is None:
            raise ValueError(f"attention {impl!r} takes cache layouts only (no explicit mask); use impl='xla'")
        k_chunk, v_chunk, start, chunk_len = chunk
        if impl == "splash":
            from psynth_jax.model.splash import splash_attention

            return splash_attention(q, k, v, k_chunk, v_chunk, start, chunk_len)
        return _split(impl, q, k, v, k_chunk, v_chunk, mask, start, chunk_len)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _split(impl, q, k, v, k_chunk, v_chunk, mask, start, chunk_len):
    """The split layout (cuDNN, or XLA's kernel for "xla_split"), differentiated as the XLA path.

    jax.nn.dot_product_attention returns the log-sum-exp that merges the two calls without a
    gradient (stop_gradient in XLA's implementation, dropped by cuDNN's backward rule), so
    differentiating the merge directly gives wrong query and key gradients. The backward is
    therefore the blockwise XLA attention's (flash.py) over the same layout: exact, memory
    O(tile), at the price of one XLA forward recomputed in the backward pass.
    """
    from psynth_jax.model.attention_kernels import split_attention

    kernel = "cudnn" if impl == "cudnn" else "xla"
    return split_attention(q, k, v, k_chunk, v_chunk, start, chunk_len, kernel=kernel)


def _split_fwd(impl, q, k, v, k_chunk, v_chunk, mask, start, chunk_len):
    return _split(impl, q, k, v, k_chunk, v_chunk, mask, start, chunk_len), (q, k, v, k_chunk, v_chunk, mask, start,
                                                                              chunk_len)


def _split_bwd(impl, res, g):
    q, k, v, k_chunk, v_chunk, mask, start, chunk_len = res

    def reference(q, k, v, kc, vc):
        return xla_attention(q, k, v, mask, (kc, vc, start, chunk_len))

    grads = jax.vjp(reference, q, k, v, k_chunk, v_chunk)[1](g)
    no_grad = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # noqa: E731 (integer / boolean inputs)
    return (*grads, jax.tree.map(no_grad, mask), no_grad(start), no_grad(chunk_len))


_split.defvjp(_split_fwd, _split_bwd)


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
        logits.append(jnp.where(vis, lg, _MASK_VALUE))
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerView:
    """One layer of a kv_cache.BranchView as a Block reads it (built by the Decoder's layer scan).

    k, v: this layer's worker rows [B*K, S_w, Hkv, D], the scan's slice: the key block's shape,
    never read (XLA drops it); k_stack, v_stack [L, B*K, S_w, Hkv, D] and `layer`: where the
    tiles are read in place; starts, lengths, offsets [B, K]; k_scale ... v_shift [B, K, Hkv].
    """

    k: jax.Array
    v: jax.Array
    k_stack: jax.Array
    v_stack: jax.Array
    layer: jax.Array
    starts: jax.Array
    lengths: jax.Array
    offsets: jax.Array
    k_scale: jax.Array
    k_shift: jax.Array
    v_scale: jax.Array
    v_shift: jax.Array


def view_block(view: LayerView, q_pre: jax.Array, q: jax.Array, positions: jax.Array,
               inv_freq: jax.Array) -> KeyBlock:
    """The zero-copy branch view as one key block of K sub-blocks (one per branch).

    With k the worker's key (at its worker position), P the offset and (a, b) the mapper's
    affine, the materialised path attends to k' = a R(-P) k + b and v' = a_v v + b_v. Here:
    - queries: branch i sees R(P_i) q, i.e. q_pre rotated to position + P_i, scaled by a_k_i:
      q . (a R(-P) k) = a (R(P) q) . k (RoPE rotations are orthogonal and compose additively);
    - score bias: scale * b_k_i * sum(q) for every key of branch i (q . b = b sum(q));
    - values: a_v_i (p . v) + b_v_i sum(p), folded into the softmax accumulation;
    - keys: the worker rows as they are, each row's kept span only (flash.py's span tiles: no
      work on a worker's prompt slots or unused room), seen by every query.
    q_pre: queries before RoPE [B,T,Hq,D]; q: after RoPE at `positions` [B,T].
    The worker K/V carry no gradient (the backbone is frozen); the mapper's scalars and the
    queries do.
    """
    b, t, hq, d = q.shape
    nb = view.starts.shape[1]
    s_w, hkv = view.k.shape[1:3]
    g = hq // hkv
    f32 = jnp.float32

    def per_q_head(x):  # [B, K, Hkv] -> [B, K, Hq]
        return jnp.repeat(x.astype(f32), g, axis=-1)

    qv = apply_rope(q_pre[:, None], positions[:, None, :] + view.offsets[:, :, None], inv_freq)  # [B,K,T,Hq,D]
    qv = (qv.astype(f32) * per_q_head(view.k_scale)[:, :, None, :, None]).astype(q.dtype)
    bias = (d**-0.5) * per_q_head(view.k_shift)[:, :, None, :] * q.astype(f32).sum(-1)[:, None]  # [B,K,T,Hq]
    shape = (b, nb, s_w, hkv, d)
    return KeyBlock(
        q=qv, k=jax.lax.stop_gradient(view.k).reshape(shape), v=jax.lax.stop_gradient(view.v).reshape(shape),
        slot=None, valid=None, bias=bias, v_scale=view.v_scale, v_shift=view.v_shift,
        k_src=jax.lax.stop_gradient(view.k_stack), v_src=jax.lax.stop_gradient(view.v_stack), layer=view.layer,
        span_start=view.starts, span_len=view.lengths,
        kv_grad=False,
    )


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
    logits = jnp.where(visible, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
