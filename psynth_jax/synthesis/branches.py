"""Branch caches as arrays: extract the kept spans, re-encode, assemble (the materialised handoff).

For B requests x K branches (METHOD.md sections 1-3), on the `BranchCaches` of model/kv_cache.py:
1. `extract_branches`: from worker caches (one row per branch), keep the KV of each branch's
   kept span (slots [start_i, start_i + L_i); which span is the handoff convention's,
   synthesis/handoff.py); the rest of the prompt KV is dropped.
2. `reencode`: rotate kept keys by -P_i (exact RoPE shift), P_i the worker prompt's length, so
   every branch's output starts at position 0.
3. the cache mapper (mapper.map_caches) rescales keys and values per (layer, branch).
4. `assemble`: pack each request's branches contiguously in worker order into a synthesizer
   `KVCache` whose valid slots are exactly the kept branch tokens, with `next_pos = max_i L_i`
   so the synthesizer prompt is prefilled at positions max_i L_i + j.

synthesis/core.py composes these into the cache path (`prepare` = 2-4) that every consumer uses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from psynth_jax import distributed
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import BranchCaches, BranchView, KVCache
from psynth_jax.model.rope import apply_rope, inverse_frequencies


def check_branches(branches: BranchCaches | BranchView, cfg: ModelConfig, max_branch_tokens: int | None = None) -> None:
    """Host-side validation with errors that name the problem (call before jitted work); copied
    branch caches or a zero-copy view of worker rows alike."""
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    got = (branches.k.shape[0], branches.k.shape[-2], branches.k.shape[-1])
    if got != want:
        raise ValueError(
            f"branch caches have (layers, kv_heads, head_dim)={got} but the synthesizer model has {want}: "
            "caches from a different model shape cannot be consumed"
        )
    if branches.num_branches == 0:
        raise ValueError("K = 0: Parallel-Synthesis needs at least one branch")
    lengths = distributed.fetch(branches.lengths)
    for b, row in enumerate(lengths):
        for i, n in enumerate(row):
            if n <= 0:
                raise ValueError(f"branch {i} of request {b} is empty (0 output tokens)")
            if max_branch_tokens is not None and n > max_branch_tokens:
                raise ValueError(
                    f"branch {i} of request {b} has {n} tokens, over the budget of {max_branch_tokens} per branch"
                )


def extract_branches(
    cache: KVCache, starts: jax.Array, lengths: jax.Array, offsets: jax.Array, *, num_requests: int,
    branch_slots: int,
) -> BranchCaches:
    """Worker cache rows (B*K, request-major) -> BranchCaches holding slots [starts, starts + lengths).

    offsets [B*K]: the RoPE shift each row's keys need (its worker prompt length P).
    """
    j = jnp.arange(branch_slots, dtype=jnp.int32)
    idx = jnp.clip(starts[:, None] + j[None, :], 0, cache.num_slots - 1)  # [B*K, Lb]
    keep = j[None, :] < lengths[:, None]

    def take(x):  # [layers, B*K, S, H, D] -> [layers, B, K, Lb, H, D]
        g = jnp.take_along_axis(x, idx[None, :, :, None, None], axis=2)
        g = jnp.where(keep[None, :, :, None, None], g, jnp.zeros((), g.dtype))
        return g.reshape((x.shape[0], num_requests, -1) + g.shape[2:])

    shape = (num_requests, -1)
    return BranchCaches(
        k=take(cache.k), v=take(cache.v), lengths=lengths.reshape(shape).astype(jnp.int32),
        offsets=offsets.reshape(shape).astype(jnp.int32),
    )


def reencode(branches: BranchCaches, cfg: ModelConfig) -> BranchCaches:
    """Exact RoPE shift of every branch's keys by -offsets: branch i then occupies [0, L_i)."""
    inv_freq = jnp.asarray(inverse_frequencies(cfg))
    delta = jnp.broadcast_to(-branches.offsets[None, :, :, None], branches.k.shape[:4])
    k = apply_rope(branches.k, delta, inv_freq)
    return dataclasses.replace(branches, k=k, offsets=jnp.zeros_like(branches.offsets))


def assemble(branches: BranchCaches, extra_slots: int) -> KVCache:
    """Pack each request's branches contiguously (worker order) into a synthesizer KVCache.

    Slots [0, sum_i L_i) hold the branch tokens, then `extra_slots` + padding for the prompt and
    decoding. `end = sum_i L_i` so the prompt follows the last branch token directly; its RoPE
    positions start at `next_pos = max_i L_i`.
    """
    layers, b, k, lb = branches.k.shape[:4]
    lengths = branches.lengths
    cum_end = jnp.cumsum(lengths, axis=1)  # [B, K]
    total = cum_end[:, -1]
    s = jnp.arange(k * lb, dtype=jnp.int32)
    branch = jax.vmap(lambda ce: jnp.searchsorted(ce, s, side="right"))(cum_end)  # [B, K*Lb]
    branch = jnp.minimum(branch, k - 1)
    start = jnp.take_along_axis(cum_end - lengths, branch, axis=1)
    src = branch * lb + (s[None, :] - start)
    valid = s[None, :] < total[:, None]
    src = jnp.where(valid, src, 0)

    def pack(x):  # [layers, B, K, Lb, H, D] -> [layers, B, K*Lb + extra, H, D]
        flat = x.reshape((layers, b, k * lb) + x.shape[4:])
        g = jnp.take_along_axis(flat, src[None, :, :, None, None], axis=2)
        g = jnp.where(valid[None, :, :, None, None], g, jnp.zeros((), g.dtype))
        return jnp.pad(g, ((0, 0), (0, 0), (0, extra_slots), (0, 0), (0, 0)))

    return KVCache(
        k=pack(branches.k), v=pack(branches.v),
        valid=jnp.pad(valid, ((0, 0), (0, extra_slots))),
        end=total.astype(jnp.int32), next_pos=jnp.max(lengths, axis=1).astype(jnp.int32),
    )
