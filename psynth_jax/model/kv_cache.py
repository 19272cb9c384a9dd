"""The one KV-cache type and every branch-cache type: what each stage of the flow hands the next.

Layout: keys/values [layers, batch, slots, kv_heads, head_dim]. A *slot* is a storage index; the
RoPE *position* a key was embedded at is separate, because Parallel-Synthesis stores several
branches that all start at position 0 side by side in slot space. Per row:

- `valid[b, s]`: slot s holds a real token that later queries may attend to (padding and
  never-written slots are False).
- `end[b]`: the next slot a new token is written to.
- `next_pos[b]`: the RoPE position the next token gets.

A query written at slot s attends to every valid key at a slot <= s (`AttentionMask`, the one
visibility rule every attention kernel implements). Invariant kept by every writer here: valid
slots are contiguous, `valid[b, s] == (s < end[b])` (padding only ever ends a chunk, and the
next write starts at `end`); fused attention kernels rely on it. For a plain prompt this is
ordinary causal attention; for a synthesizer whose prompt is written after the branch region it
means "every real branch token plus the earlier prompt tokens", the layout of METHOD.md section 3.

The branch caches a worker hands the synthesizer come in two forms, both here so that every
stage (synthesis, training, the decoder's attention) shares one definition:
- `BranchCaches`: the kept K/V copied out of the worker rows, K branches per request (the
  materialised cache path; synthesis/branches.py re-encodes, maps and assembles them);
- `BranchView`: the worker rows themselves, viewed at their kept spans (the zero-copy path), and
  `LayerView`, one layer of it as the decoder's layer scan hands it to the attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from psynth_jax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, Hkv, D]
    v: jax.Array  # [L, B, S, Hkv, D]
    valid: jax.Array  # [B, S] bool
    end: jax.Array  # [B] int32
    next_pos: jax.Array  # [B] int32

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype: jnp.dtype) -> "KVCache":
        """An empty cache (zero-filled: jnp.empty is uninitialised since jax 0.11)."""
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, slots), bool),
            end=jnp.zeros((batch,), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    def check_compatible(self, cfg: ModelConfig) -> None:
        """Raise if this cache was made for a model of another shape."""
        want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        got = (self.k.shape[0], self.k.shape[3], self.k.shape[4])
        if got != want:
            raise ValueError(
                f"KV cache shape (layers, kv_heads, head_dim)={got} does not match the model's {want}: "
                "caches from a different model cannot be consumed"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
    """Which keys each query sees: the slot rule above, or an explicit boolean mask.

    Query t of row b sits at slot `q_slots[b, t]` and sees key slot s iff `kv_valid[b, s]` and
    `s <= q_slots[b, t]`. Causal prompts, right-padding, decode steps and the "all branch tokens +
    causal prompt" layout are all this rule. Layouts outside it (several branches with their worker
    prompts in one sequence, the from-scratch reference of the cache handoff in tests) pass
    `explicit`, which only the XLA kernel accepts.
    """

    q_slots: jax.Array  # [B, T] int32
    kv_valid: jax.Array  # [B, S] bool
    explicit: jax.Array | None = None  # [B, T, S] bool: replaces the slot rule (XLA only)

    def dense(self) -> jax.Array:
        """Boolean [B, T, S] visibility."""
        if self.explicit is not None:
            return self.explicit
        s = jnp.arange(self.kv_valid.shape[1], dtype=jnp.int32)
        return self.kv_valid[:, None, :] & (s[None, None, :] <= self.q_slots[:, :, None])


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into buf [B, S, ...] at per-row slot offsets start [B]."""

    def one(b, n, s):
        return jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=0)

    return jax.vmap(one)(buf, new.astype(buf.dtype), start)


def write_layers(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [L, B, T, ...] into a stacked cache buf [L, N, S, ...] (N >= B: its first B rows) at
    per-row slots start [B].

    Same placement as `write_rows` per layer (a start past S - T is clamped to it, as
    dynamic_update_slice does), written as one scatter in the cache's own layout: a vmapped
    update_slice over the batch axis makes XLA relayout (copy) the whole cache around it.
    """
    b, s, t = new.shape[1], buf.shape[2], new.shape[2]
    first = jnp.clip(start.astype(jnp.int32), 0, s - t)
    slots = first[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1 and b == buf.shape[1]:
        # Under a mesh the rows are sharded: a scatter with the batch as a batching dimension stays
        # per shard, where explicit row indices make the partitioner all-gather every row's cache
        # onto every device (measured by `psynth plan`: [L, B, S, H, D] per device).
        def one(rows_buf, rows_new, row_slots):  # [L, S, ...], [L, T, ...], [T]
            return rows_buf.at[:, row_slots].set(rows_new, unique_indices=True)

        return jax.vmap(one, in_axes=(1, 1, 0), out_axes=1)(buf, new.astype(buf.dtype), slots)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    return buf.at[:, rows, slots].set(new.astype(buf.dtype), unique_indices=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BranchCaches:
    """Output-token KV of K branches per request, padded to a common branch length Lb.

    k, v: [layers, B, K, Lb, kv_heads, head_dim]; lengths L_i [B, K] (kept tokens); offsets [B, K]:
    the RoPE shift still to undo, the worker prompt length P_i (0 once re-encoded).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    offsets: jax.Array

    @property
    def num_requests(self) -> int:
        return self.k.shape[1]

    @property
    def num_branches(self) -> int:
        return self.k.shape[2]

    @property
    def branch_slots(self) -> int:
        return self.k.shape[3]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BranchView:
    """K branch caches per request, read where the workers left them (the zero-copy cache path).

    The materialised handoff copies each branch's kept K/V out of the worker rows, rotates the
    keys by -P_i, applies the cache mapper and packs the result into a synthesizer cache. A view
    does none of that: the synthesizer's attention reads the worker rows in place and folds
    the same algebra into the queries and the softmax (kernels/view.py):
    q . (a_k R(-P) k + b_k) = a_k (R(P) q) . k + b_k sum(q), and p . (a_v v + b_v) = a_v (p . v) + b_v sum(p).
    The worker cache is never written, so one set of worker rows can serve several syntheses.

    k, v: the worker caches [L, B*K, S_w, Hkv, D] (rows request-major, slot == worker position).
    starts, lengths [B, K]: each row's kept span, slots [start, start + length).
    offsets [B, K]: the RoPE shift the materialised path applies to the kept keys (-offset),
    the worker prompt length P.
    k_scale, k_shift, v_scale, v_shift [L, B, K, Hkv] float32: the mapper's affine per (layer,
    branch, KV head); ones and zeros are the identity.
    The synthesizer's own tokens (prompt, answer) go into an ordinary KVCache beside it, whose
    positions start at max_i lengths_i, as after the materialised branch region.
    """

    k: jax.Array
    v: jax.Array
    starts: jax.Array
    lengths: jax.Array
    offsets: jax.Array
    k_scale: jax.Array
    k_shift: jax.Array
    v_scale: jax.Array
    v_shift: jax.Array

    @property
    def num_requests(self) -> int:
        return self.starts.shape[0]

    @property
    def num_branches(self) -> int:
        return self.starts.shape[1]

    def layer_arrays(self) -> tuple[jax.Array, ...]:
        """The per-layer arrays (a layer scan's xs): k, v and the four mapper scalars."""
        return self.k, self.v, self.k_scale, self.k_shift, self.v_scale, self.v_shift


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerView:
    """One layer of a BranchView as a Block reads it (built by the Decoder's layer scan).

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

