"""One attention entry point with an explicit mask description, dispatching to a kernel.

`attend` takes the mask as an `AttentionMask` (model/kv_cache.py: visibility by slots) and the
kernel by name:
- "xla": float32 softmax over the cache as it was plus the chunk's own keys, never a written
  copy of the layer cache (xla.py): blockwise with an online softmax for prefill and extend
  (flash.py), one multiply-reduce pass for a decode step. The only implementation that reads a
  zero-copy branch view (view.py). `xla.dense_attention`, the masked softmax over a cache that
  already holds the chunk, is the reference in tests and serves explicit masks.
- "cudnn": cuDNN flash attention on GPU, with the layout given as sequence lengths and offsets
  (cudnn_split.py). Needs the chunk's own keys/values and the contiguous cache invariant of
  kv_cache.py; refuses explicit masks rather than silently ignoring them.
- "xla_split": the same split layout run by XLA's kernel: checks the cuDNN path's algebra on
  any platform (CPU tests), and is a fallback where cuDNN refuses a shape.
- "splash": jax's TPU splash-attention Pallas kernel over [cache prefix | causal chunk] in one
  call, the per-row prefix and chunk lengths given as segment ids (splash.py). Same cache
  layouts and the same refusal of explicit masks as "cudnn"; off TPU it runs in Pallas
  interpret mode (a slow correctness check). Under a multi-device context mesh (`jax.set_mesh`,
  or the train/eval steps, which trace with their mesh in context) the kernel runs inside a
  shard_map over it, batch over (data, fsdp) and heads over tensor, since jit cannot partition a
  Mosaic kernel; checked in interpret mode on fake CPU devices only, never on a TPU.
- "cpu": "xla", except that a float32 decode step reads its layer of the stacked cache in place
  through an XLA FFI kernel of ours (cpu.py, cpu_decode.cc; built on first use), instead of the
  per-layer copy and block-diagonal matmuls of `xla.decode_attention`, and that every float32
  forward (decode, prefill, extend) reads the layers' weights in place likewise (cpu_matmul.cc,
  called by the model's projections). CPU only; under a multi-device mesh it is "xla".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.model.kernels import cpu
from psynth_jax.model.kernels.cudnn_split import split_attention
from psynth_jax.model.kernels.flash import KeyBlock
from psynth_jax.model.kernels.splash import splash_attention
from psynth_jax.model.kernels.xla import dense_attention, xla_attention
from psynth_jax.model.kv_cache import AttentionMask

IMPLEMENTATIONS = ("xla", "cudnn", "xla_split", "splash", "cpu")


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
    if impl == "cpu" and _cpu_decode(q, k, mask, chunk, stacked, view):
        k_chunk, v_chunk, start, _ = chunk
        return cpu.decode_attention(q, mask.kv_valid, mask.q_slots, start, k_chunk, v_chunk, stacked)
    if impl in ("xla", "cpu"):
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
            return splash_attention(q, k, v, k_chunk, v_chunk, start, chunk_len)
        return _split(impl, q, k, v, k_chunk, v_chunk, mask, start, chunk_len)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def cpu_weights_in_place(dtype: jnp.dtype) -> bool:
    """Whether the "cpu" path's matmul kernel reads the layers' weights in place for activations of
    `dtype`: float32 on one device (under a multi-device mesh the XLA path runs: XLA cannot
    partition the kernels)."""
    mesh = jax.sharding.get_abstract_mesh()
    return dtype == jnp.float32 and (mesh.empty or mesh.size == 1)


def cpu_decode_step(dtype: jnp.dtype, t: int) -> bool:
    """Whether the "cpu" path's attention kernel takes a step of `t` tokens in `dtype`: a decode
    step (T = 1) where the weights are read in place (`cpu_weights_in_place`)."""
    return t == 1 and cpu_weights_in_place(dtype)


def _cpu_decode(q, k, mask, chunk, stacked, view) -> bool:
    """Whether the "cpu" path's attention kernel takes this call: a decode step (`cpu_decode_step`)
    over a layer of a float32 stacked cache, with the slot-rule mask and no branch view."""
    return (cpu_decode_step(q.dtype, q.shape[1]) and chunk is not None and stacked is not None and view is None
            and mask.explicit is None and k.dtype == stacked[0].dtype == jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _split(impl, q, k, v, k_chunk, v_chunk, mask, start, chunk_len):
    """The split layout (cuDNN, or XLA's kernel for "xla_split"), differentiated as the XLA path.

    jax.nn.dot_product_attention returns the log-sum-exp that merges the two calls without a
    gradient (stop_gradient in XLA's implementation, dropped by cuDNN's backward rule), so
    differentiating the merge directly gives wrong query and key gradients. The backward is
    therefore the blockwise XLA attention's (flash.py) over the same layout: exact, memory
    O(tile), at the price of one XLA forward recomputed in the backward pass.
    """
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

