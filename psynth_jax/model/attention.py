"""One attention entry point with an explicit mask description.

`AttentionMask` describes visibility by slots (see kv_cache.py): query t of row b sits at slot
`q_slots[b, t]` and sees key slot s iff `kv_valid[b, s]` and `s <= q_slots[b, t]`. Causal
prompts, right-padding, decode steps and the Parallel-Synthesis "all branch tokens + causal
prompt" layout are all instances of this one rule. Layouts outside it (e.g. several branches
with their worker prompts in one sequence, block-diagonal, used as the from-scratch reference
of the cache handoff) pass an `explicit` boolean mask, which only the XLA path accepts.

Implementations:
- "xla": dense masked softmax in float32. Handles every mask; the reference in tests.
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
) -> jax.Array:
    """Grouped-query attention. q [B,T,Hq,D], k/v [B,S,Hkv,D] (cache incl. the chunk) -> [B,T,Hq,D].

    chunk = (k_chunk, v_chunk, start, chunk_len): the new tokens' own keys/values, where they
    were written, and how many are valid; fused kernels use it instead of a dense mask. Query
    rows that see no key at all (padding) return zeros in the XLA path, and finite values
    without meaning in "splash".
    """
    if impl == "xla":
        return xla_attention(q, k, v, mask)
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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
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
