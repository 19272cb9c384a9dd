"""Blockwise ("flash") attention in XLA: an online softmax over key tiles, with its own VJP.

The dense reference (xla.dense_attention) builds the [T, S] score matrix per head; its
time and memory grow with T x S and, under `jax.grad`, its backward keeps the probabilities
too. Here queries are cut into tiles of `block_q` rows and keys into tiles of `block_k`
columns; each (query tile, key tile) pair is one step of a loop, and a running maximum,
sum and float32 accumulator per query (the online softmax) merge the steps exactly. Memory is
O(block_q x block_k) per head; a tile no query of its row can see (the upper triangle of a
causal prompt, unwritten cache slots, right-padding) is skipped with `lax.cond`.

The keys come as one or more `KeyBlock`s that are never concatenated (that would copy them):
the cache as it was before the chunk, the chunk's own keys, and (the zero-copy synthesis view)
the worker rows holding the branch keys. A block holds N parallel sub-blocks (N branches
sharing each query; N = 1 for a cache) and may carry, per sub-block:
- its own view of the queries (q rotated by a RoPE shift: q . R(-P) k = R(P) q . k);
- a score bias per query (the cache mapper's beta_k * sum(q));
- an affine on its values per key/value head, p . (a v + b) = a (p . v) + b sum(p) (alpha_v,
  beta_v), applied to each value tile as it is read.
Visibility, per block: key s of sub-block n is seen by query t iff `valid[b, n, s]` and
`slot[b, n, s] <= q_slot[b, t]`; or, for a block given per-row spans (the view), iff s lies in
its row's span, the tiles then following each row's span. A query that sees no key returns
zeros.

The VJP is the flash-attention backward: it keeps only the inputs, the output and the
per-query log-sum-exp, and recomputes each tile's probabilities; so `jax.grad` through it
never holds a [T, S] array either. Gradients with respect to a block's keys and values are
only computed when its `kv_grad` is set (the zero-copy view's branch K/V are constants of the
frozen backbone, and its caller stops their gradient explicitly).

Tiles: ceil(n / block) of equal size; when that does not divide n, the last one is moved back
to end at the last row (overlapping the one before by fewer rows than there are tiles), and its
rows already covered are masked (keys) or dropped from the gradient (queries); so no input is
ever padded or copied. The loops are `lax.while_loop`s (see `_loop` for why not scans).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked score (finite: exp(NEG - m) == 0, no NaN)
FLOOR = -1e30  # the running max starts here: far above NEG (exp(NEG - FLOOR) == 0 exactly, so masked
#                scores need no second mask) and far below any real score
ALWAYS = -(2**30)  # slot of a key every query sees (a branch block of the zero-copy view)
BLOCK_Q = 256  # tile sizes: the best of 64-1024 measured on the 2-core CPU (SmolLM2's 9 heads):
BLOCK_K = 512  # smaller tiles lose more to per-iteration overhead than they gain in cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KeyBlock:
    """Keys (and the queries as they see them) of one attention block; see the module docstring.

    q: [B, N, T, Hq, D]; k, v: [B, N, S, Hkv, D]; slot: [B, N, S] int32; valid: [B, N, S] bool;
    bias: [B, N, T, Hq] float32 or None; v_scale, v_shift: [B, N, Hkv] float32 or None (one
    affine per key/value head, as the cache mapper has).
    k_src, v_src, layer: optionally the stacked arrays [L, B*N, S, Hkv, D] (a KV cache's layout)
    that k and v are layer `layer` of (int32 scalar). Tiles are then read from the stack in
    place, and k, v only carry the gradient: a layer slice of a stacked cache handed to a loop
    would otherwise be materialised as a copy on every layer. The VJP returns zeros for k_src
    and v_src.
    span_start, span_len: optionally [B, N] int32: the block's keys are exactly slots
    [span_start, span_start + span_len) of each row, every one seen by every query (slot and
    valid are then None), and the tiles follow each row's span (tile j: its positions
    [j * tile, (j + 1) * tile), gathered per row), so no work goes to the other slots of the
    rows (a worker's prompt, unused room). Needs kv_grad=False (tiles are gathered, not sliced).
    kv_grad: whether the VJP computes cotangents for k and v (static; zeros otherwise).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    slot: jax.Array | None
    valid: jax.Array | None
    bias: jax.Array | None = None
    v_scale: jax.Array | None = None
    v_shift: jax.Array | None = None
    k_src: jax.Array | None = None
    v_src: jax.Array | None = None
    layer: jax.Array | None = None
    span_start: jax.Array | None = None
    span_len: jax.Array | None = None
    kv_grad: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def __post_init__(self) -> None:
        if self.span_start is not None and self.kv_grad:
            raise ValueError("a KeyBlock with per-row spans gathers its tiles: it needs kv_grad=False")


class _Tiling(NamedTuple):
    size: int  # rows per tile
    count: int  # tiles

    @classmethod
    def of(cls, n: int, block: int) -> "_Tiling":
        """ceil(n / block) tiles of equal size (at most `block`): the last one overlaps the one
        before by fewer rows than there are tiles, instead of by up to a whole tile."""
        count = max(-(-n // max(block, 1)), 1)
        return cls(max(-(-n // count), 1), count)

    def start(self, i: jax.Array, n: int) -> jax.Array:
        """First row of tile i: i * size, the last tile moved back to end at row n."""
        return jnp.minimum(i * self.size, n - self.size)

    def fresh(self, i: jax.Array, n: int) -> jax.Array:
        """[size] bool: rows of tile i not already covered by tile i - 1."""
        return self.start(i, n) + jnp.arange(self.size, dtype=jnp.int32) >= i * self.size


def flash_attention(blocks: tuple[KeyBlock, ...], q_slot: jax.Array, *, scale: float,
                    block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Attention of T queries over every block's keys -> [B, T, Hq, D] in the queries' dtype.

    q_slot [B, T] int32: the slot of each query (visibility rule above). All blocks share the
    softmax: the result equals dense attention over the concatenation of their keys.
    """
    if not blocks:
        raise ValueError("flash_attention needs at least one key block")
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    return _flash(_Static(float(scale), int(block_q), int(block_k)), tuple(blocks), q_slot)


class _Static(NamedTuple):
    scale: float
    block_q: int
    block_k: int


# ------------------------------------------------------------------ shared tile algebra
def _split_heads(x: jax.Array, hkv: int) -> jax.Array:
    """[B, N, T, Hq, (D)] with Hq = Hkv * G -> [B, N, T, Hkv, G, (D)]."""
    return x.reshape(x.shape[:3] + (hkv, -1) + x.shape[4:])


def _scores(st: _Static, q_t: jax.Array, k_t: jax.Array, bias_t: jax.Array | None, vis: jax.Array) -> jax.Array:
    """q_t [B,N,Hkv,G,Tq,D], k_t [B,N,Tk,Hkv,D], bias_t [B,N,Hkv,G,Tq] -> float32 scores
    [B,N,Hkv,G,Tq,Tk], NEG where not visible."""
    s = jnp.einsum("bnkgqd,bntkd->bnkgqt", q_t, k_t, preferred_element_type=jnp.float32) * st.scale
    if bias_t is not None:
        s = s + bias_t[..., None]
    return jnp.where(vis, s, NEG)


def _query_tile(blk: KeyBlock, q0: jax.Array, tq: int, hkv: int) -> tuple[jax.Array, jax.Array | None]:
    """A block's queries [B,N,Hkv,G,Tq,D] and score bias [B,N,Hkv,G,Tq] (float32) at rows
    [q0, q0 + tq), laid out once per query tile for the batched dots of every key tile."""
    q_t = jnp.moveaxis(_split_heads(_slice(blk.q, q0, tq, 2), hkv), 2, 4)
    if blk.bias is None:
        return q_t, None
    return q_t, jnp.moveaxis(_split_heads(_slice(blk.bias, q0, tq, 2).astype(jnp.float32), hkv), 2, 4)


def _visible(slot_t: jax.Array, valid_t: jax.Array, qs_t: jax.Array) -> jax.Array:
    """[B,N,Tk] key slots/validity and [B,Tq] query slots -> [B,N,1,1,Tq,Tk] visibility."""
    vis = valid_t[:, :, None, :] & (slot_t[:, :, None, :] <= qs_t[:, None, :, None])
    return vis[:, :, None, None]


def _affine(x: jax.Array | None) -> jax.Array | None:
    """[B,N,Hkv] -> [B,N,Hkv,1,1] (broadcast over a tile's query groups and rows), float32."""
    return None if x is None else x.astype(jnp.float32)[..., None, None]


def _mapped_values(v_t: jax.Array, blk: KeyBlock) -> jax.Array:
    """A value tile [B,N,Tk,Hkv,D] under the block's affine [B,N,Hkv], a v + c, in v's dtype (what
    the materialised cache mapper stores): applied to the tile copy the gather makes anyway, so the
    softmax accumulation is one plain contraction over (sub-block, key)."""
    if blk.v_scale is None and blk.v_shift is None:
        return v_t
    y = v_t.astype(jnp.float32)
    if blk.v_scale is not None:
        y = y * blk.v_scale.astype(jnp.float32)[:, :, None, :, None]
    if blk.v_shift is not None:
        y = y + blk.v_shift.astype(jnp.float32)[:, :, None, :, None]
    return y.astype(v_t.dtype)


def _loop(count: int | jax.Array, body, init):
    """carry = body(i, carry) for i in range(count), as a `lax.while_loop`.

    Not a scan: under jax.grad, JAX's partial evaluation of a scan nested in another scan (the
    model's layer scan) hoists the work that depends only on loop-invariant inputs (the
    visibility of every tile, from slots and validity) out of the loop as stacked arrays, i.e.
    it would build the [T, S] arrays this kernel avoids; a while_loop is never split that way.
    JAX never differentiates these loops itself (the custom VJP below does), so no scan is needed.
    """
    def step(c):
        i, carry = c
        return i + 1, body(i, carry)

    return jax.lax.while_loop(lambda c: c[0] < count, step, (jnp.zeros((), jnp.int32), init))[1]


def _slice(x: jax.Array, start: jax.Array, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _add_at(x: jax.Array, start: jax.Array, update: jax.Array, axis: int) -> jax.Array:
    """x with `update` added at rows [start, start + len) of `axis` (in place inside a loop)."""
    cur = _slice(x, start, update.shape[axis], axis)
    return jax.lax.dynamic_update_slice_in_dim(x, cur + update.astype(x.dtype), start, axis=axis)


def _key_tiling(blk: KeyBlock, block_k: int) -> _Tiling:
    """The key tiles of a block; with spans, as many as the longest span needs (a traced count).

    Span tiles are a power of two in size (at most block_k and the row): a worker's kept span
    is its output, and output budgets are usually powers of two, which then tile with no masked
    slot (a tile of the whole row would also read the worker's prompt: 20% of it at 64 + 256).
    """
    s_len = blk.k.shape[2]
    if blk.span_start is None:
        return _Tiling.of(s_len, block_k)
    size = 1 << (max(min(block_k, s_len), 1).bit_length() - 1)
    return _Tiling(size, (jnp.max(blk.span_len) + size - 1) // size)


def _key_tile(blk: KeyBlock, tk: _Tiling, j: jax.Array):
    """Tile j of a block's keys: (k, v, slot, valid with already-covered keys masked, start)."""
    if blk.span_start is not None:
        return _span_tile(blk, tk, j)
    s_len = blk.k.shape[2]
    k0 = tk.start(j, s_len)
    valid = _slice(blk.valid, k0, tk.size, 2) & tk.fresh(j, s_len)[None, None, :]
    if blk.k_src is None:
        k_t, v_t = _slice(blk.k, k0, tk.size, 2), _slice(blk.v, k0, tk.size, 2)
    else:  # straight from the stack [L, B*N, S, H, D] at (layer, k0)
        zero = jnp.zeros((), jnp.int32)
        at = (blk.layer.astype(jnp.int32), zero, k0, zero, zero)
        size = (1, blk.k_src.shape[1], tk.size) + blk.k_src.shape[3:]
        shape = blk.k.shape[:2] + (tk.size,) + blk.k.shape[3:]
        k_t = jax.lax.dynamic_slice(blk.k_src, at, size).reshape(shape)
        v_t = jax.lax.dynamic_slice(blk.v_src, at, size).reshape(shape)
    return k_t, v_t, _slice(blk.slot, k0, tk.size, 2), valid, k0


def _span_tile(blk: KeyBlock, tk: _Tiling, j: jax.Array):
    """Tile j of a span block: positions [j * size, (j + 1) * size) of every row's span, gathered
    from slots span_start + position (a read window clamped into the row; the positions the tile
    owns stay inside it, the others are masked)."""
    b, n, s_len = blk.k.shape[:3]
    rows = b * n
    start, length = blk.span_start.reshape(rows, 1), blk.span_len.reshape(rows, 1)
    first = jnp.clip(start + j * tk.size, 0, s_len - tk.size)  # [rows, 1]
    slots = first + jnp.arange(tk.size, dtype=jnp.int32)[None, :]  # [rows, size]
    rel = slots - start
    valid = (rel >= j * tk.size) & (rel < (j + 1) * tk.size) & (rel < length)
    shape = (b, n, tk.size) + blk.k.shape[3:]
    if blk.k_src is None:
        src_k, src_v = (x.reshape((1, rows) + x.shape[2:]) for x in (blk.k, blk.v))
        layer = jnp.zeros((), jnp.int32)
    else:
        src_k, src_v, layer = blk.k_src, blk.v_src, blk.layer.astype(jnp.int32)

    zero = jnp.zeros((), jnp.int32)

    def one_row(row: jax.Array, f: jax.Array) -> jax.Array:  # row [L, S, H, D] -> [size, H, D] at (layer, f)
        return jax.lax.dynamic_slice(row, (layer, f, zero, zero), (1, tk.size) + row.shape[2:])[0]

    def rows_at(src: jax.Array) -> jax.Array:  # a gather batched over the rows (each row's own window)
        return jax.vmap(one_row, in_axes=(1, 0))(src, first[:, 0])

    k_t, v_t = rows_at(src_k), rows_at(src_v)
    slot = jnp.full((b, n, tk.size), ALWAYS, jnp.int32)
    return k_t.reshape(shape), v_t.reshape(shape), slot, valid.reshape(b, n, tk.size), None


def _live(slot_t: jax.Array, valid_t: jax.Array, qs_t: jax.Array) -> jax.Array:
    """Whether any query of the tile can see any key of it (a cheap bound: O(Tk), not O(Tq Tk))."""
    return jnp.any(valid_t & (slot_t <= jnp.max(qs_t)))


# ------------------------------------------------------------------ forward
def _forward(st: _Static, blocks: tuple[KeyBlock, ...], q_slot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (out [B,T,Hq,D] in q's dtype, lse [B,Hkv,G,T] float32; 0 for queries that see nothing)."""
    b, _, t, hq, d = blocks[0].q.shape
    hkv = blocks[0].k.shape[3]
    g = hq // hkv
    tq = _Tiling.of(t, st.block_q)

    def q_tile(i, carry):
        out, lse = carry
        q0 = tq.start(i, t)
        qs_t = _slice(q_slot, q0, tq.size, 1)
        state = (jnp.full((b, hkv, g, tq.size), FLOOR, jnp.float32), jnp.zeros((b, hkv, g, tq.size), jnp.float32),
                 jnp.zeros((b, hkv, g, tq.size, d), jnp.float32))
        for blk in blocks:
            state = _block_forward(st, blk, q0, tq.size, qs_t, state)
        m, l, acc = state
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        out = jax.lax.dynamic_update_slice_in_dim(out, o, q0, axis=3)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0),
                                                  q0, axis=3)
        return out, lse

    init = (jnp.zeros((b, hkv, g, t, d), jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32))
    out, lse = _loop(tq.count, q_tile, init)
    out = jnp.moveaxis(out, 3, 1).reshape(b, t, hq, d).astype(blocks[0].q.dtype)
    return out, lse


def _block_forward(st: _Static, blk: KeyBlock, q0: jax.Array, tq: int, qs_t: jax.Array, state):
    """Fold one block's key tiles into the online-softmax state of one query tile."""
    hkv = blk.k.shape[3]
    tk = _key_tiling(blk, st.block_k)
    q_t, bias_t = _query_tile(blk, q0, tq, hkv)

    def step(j, state):
        k_t, v_t, slot_t, valid_t, _ = _key_tile(blk, tk, j)

        def update(state):
            m, l, acc = state
            s = _scores(st, q_t, k_t, bias_t, _visible(slot_t, valid_t, qs_t))
            m_new = jnp.maximum(m, s.max(axis=(1, 5)))
            p = jnp.exp(s - m_new[:, None, ..., None])  # [B,N,Hkv,G,Tq,Tk]; 0 where masked
            corr = jnp.exp(m - m_new)
            vm = _mapped_values(v_t, blk)
            pv = jnp.einsum("bnkgqt,bntkd->bkgqd", p.astype(vm.dtype), vm, preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(axis=(1, 5)), acc * corr[..., None] + pv

        return jax.lax.cond(_live(slot_t, valid_t, qs_t), update, lambda s_: s_, state)

    return _loop(tk.count, step, state)


# ------------------------------------------------------------------ backward
def _block_backward(st: _Static, blk: KeyBlock, q_slot: jax.Array, lse: jax.Array, dout: jax.Array,
                    delta: jax.Array, dsum: jax.Array) -> KeyBlock:
    """Cotangents of one block's float inputs (a KeyBlock of them; None for the integer ones).

    lse, delta (= sum_d dout * out), dsum (= sum_d dout): [B,Hkv,G,T]; dout [B,T,Hkv,G,D] float32.
    For each key tile (outer loop) and query tile (inner loop), with P = exp(s - lse):
    dP = a (dout . v) + c sum(dout), dS = P (dP - delta); dq = scale dS k, dbias = sum_t dS,
    dk = scale dS^T q, dv = a P^T dout, da = sum P (dout . v), dc = sum P sum(dout).
    """
    b, n, t, hq, d = blk.q.shape
    hkv = blk.k.shape[3]
    g = hq // hkv
    tq, tk = _Tiling.of(t, st.block_q), _key_tiling(blk, st.block_k)
    a, c = _affine(blk.v_scale), _affine(blk.v_shift)
    f32 = jnp.float32
    zeros = {
        "q": jnp.zeros((b, n, t, hkv, g, d), f32),
        "bias": None if blk.bias is None else jnp.zeros((b, n, t, hkv, g), f32),
        "a": None if a is None else jnp.zeros(a.shape[:3], f32),
        "c": None if c is None else jnp.zeros(c.shape[:3], f32),
    }

    def key_step(j, acc):
        k_t, v_t, slot_t, valid_t, k0 = _key_tile(blk, tk, j)

        def q_step(i, inner):
            q0 = tq.start(i, t)
            qs_t = _slice(q_slot, q0, tq.size, 1)

            def grads(inner):
                dq, dbias, da, dc, dk_t, dv_t = inner
                q_t, bias_t = _query_tile(blk, q0, tq.size, hkv)
                vis = _visible(slot_t, valid_t, qs_t) & tq.fresh(i, t)[:, None]  # a query row counts once
                lse_t = _slice(lse, q0, tq.size, 3)[:, None, ..., None]
                p = jnp.exp(_scores(st, q_t, k_t, bias_t, vis) - lse_t)  # [B,N,Hkv,G,Tq,Tk]; 0 where masked
                do_t = _slice(dout, q0, tq.size, 1)  # [B,Tq,Hkv,G,D]
                dov = jnp.einsum("bqkgd,bntkd->bnkgqt", do_t.astype(v_t.dtype), v_t, preferred_element_type=f32)
                dp = dov if a is None else dov * a[..., None]
                if c is not None:
                    dp = dp + (c * _slice(dsum, q0, tq.size, 3)[:, None])[..., None]
                ds = p * (dp - _slice(delta, q0, tq.size, 3)[:, None, ..., None])
                dq_t = jnp.einsum("bnkgqt,bntkd->bnqkgd", ds.astype(k_t.dtype), k_t, preferred_element_type=f32)
                dq = _add_at(dq, q0, dq_t * st.scale, 2)
                if dbias is not None:
                    dbias = _add_at(dbias, q0, jnp.moveaxis(ds.sum(axis=5), 4, 2), 2)
                if da is not None:
                    da = da + (p * dov).sum(axis=(3, 4, 5))
                if dc is not None:
                    dc = dc + (p.sum(axis=5) * _slice(dsum, q0, tq.size, 3)[:, None]).sum(axis=(3, 4))
                if blk.kv_grad:
                    dk_t = dk_t + st.scale * jnp.einsum("bnkgqt,bnkgqd->bntkd", ds.astype(q_t.dtype), q_t,
                                                        preferred_element_type=f32)
                    pa = p if a is None else p * a[..., None]
                    dv_t = dv_t + jnp.einsum("bnkgqt,bqkgd->bntkd", pa.astype(do_t.dtype), do_t,
                                             preferred_element_type=f32)
                return dq, dbias, da, dc, dk_t, dv_t

            return jax.lax.cond(_live(slot_t, valid_t, qs_t), grads, lambda x: x, inner)

        dq, dbias, da, dc, dk, dv = acc
        tile0 = jnp.zeros((b, n, tk.size, hkv, d), f32) if blk.kv_grad else None
        dq, dbias, da, dc, dk_t, dv_t = _loop(tq.count, q_step, (dq, dbias, da, dc, tile0, tile0))
        if blk.kv_grad:  # already-covered keys of the last tile were masked: their rows add zero
            dk, dv = _add_at(dk, k0, dk_t, 2), _add_at(dv, k0, dv_t, 2)
        return dq, dbias, da, dc, dk, dv

    full = jnp.zeros(blk.k.shape, f32) if blk.kv_grad else None
    init = (zeros["q"], zeros["bias"], zeros["a"], zeros["c"], full, full)
    dq, dbias, da, dc, dk, dv = _loop(tk.count, key_step, init)

    return KeyBlock(
        q=dq.reshape(b, n, t, hq, d).astype(blk.q.dtype),
        k=dk.astype(blk.k.dtype) if blk.kv_grad else jnp.zeros_like(blk.k),
        v=dv.astype(blk.v.dtype) if blk.kv_grad else jnp.zeros_like(blk.v),
        slot=None, valid=None, k_src=None, v_src=None, layer=None,
        bias=None if dbias is None else dbias.reshape(b, n, t, hq).astype(blk.bias.dtype),
        v_scale=None if da is None else da.astype(blk.v_scale.dtype),
        v_shift=None if dc is None else dc.astype(blk.v_shift.dtype),
        kv_grad=blk.kv_grad,
    )


# ------------------------------------------------------------------ custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, blocks: tuple[KeyBlock, ...], q_slot: jax.Array) -> jax.Array:
    return _forward(st, blocks, q_slot)[0]


def _flash_fwd(st, blocks, q_slot):
    out, lse = _forward(st, blocks, q_slot)
    return out, (blocks, q_slot, out, lse)


def _flash_bwd(st, res, g):
    blocks, q_slot, out, lse = res
    hkv = blocks[0].k.shape[3]
    b, t, hq, d = out.shape
    dout = g.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    of = out.astype(jnp.float32).reshape(dout.shape)
    delta = jnp.moveaxis((dout * of).sum(-1), 1, 3)  # [B,Hkv,G,T]
    dsum = jnp.moveaxis(dout.sum(-1), 1, 3)
    grads = tuple(_block_backward(st, blk, q_slot, lse, dout, delta, dsum) for blk in blocks)
    return grads, None


_flash.defvjp(_flash_fwd, _flash_bwd)
