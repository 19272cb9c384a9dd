"""The zero-copy branch view (model/kv_cache.py `BranchView`) as one key block of the blockwise kernel.

The synthesizer's attention reads the worker rows in place and folds the materialised handoff's
algebra (RoPE shift by -P, the cache mapper's affine) into the queries, a score bias and the
value tiles; see `view_block`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psynth_jax.model.kernels.flash import KeyBlock
from psynth_jax.model.kv_cache import LayerView
from psynth_jax.model.rope import apply_rope


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

