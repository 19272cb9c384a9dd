"""The synthesis core: the cache path and the text path as pure functions, each also jitted.

Every consumer computes Parallel-Synthesis through these and the runtime's LM primitives and
nothing else: inference (`ParallelSynthesis`), the training objective (student and KL teacher),
the agreement metric, evaluation and the benchmarks. The pure functions take a merged `Decoder`
(and `Mapper`) and arrays, so the train step can differentiate through them inside its own jit;
the `jit_*` wrappers take the model as (graphdef, state) and compile once per shape bucket.

    hand_over      worker cache rows -> their kept spans, as the synthesizer receives them: the one
                   place that picks the zero-copy view or the copy (`zero_copy`)
                     extract: BranchCaches, the kept K/V copied out (the materialised path)
                     view: a BranchView of the rows themselves, in place (the zero-copy path)
    branch_kv      worker rows [prompt | output] prefilled (LoRA off, frozen), then `hand_over`
    prepare        what the synthesizer starts from: for BranchCaches, re-encode (RoPE by -P_i) +
                   map + assemble into its KVCache (`materialise`); for a BranchView, the mapper's
                   per-(layer, branch) scalars + an empty cache for its own tokens (no branch K/V is
                   read, copied or written)
    cache_prefill  the synthesizer prompt over [branch caches | prompt] (LoRA on); with a view, the
                   attention reads the worker rows where they are and folds the re-encoding and the
                   mapper into the queries and the softmax (model/kernels/view.py); XLA attention only

The text path is the runtime's own prefill (`runtime.prefill_fn`, jitted as `runtime.prefill`),
and every answer is decoded by `runtime.continue_generation` (`runtime.decode_loop` inside a
caller's jit). The materialised path is the zero-copy path's reference, equal up to rounding.

Which span of a worker row is kept, and where its keys are moved, is the handoff convention's
(synthesis/handoff.py): callers pass `kept_start`, `kept_len` and the RoPE offset P per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import BranchCaches, BranchView, KVCache
from psynth_jax.model.sharding import BRANCH_AXES, Rules, constrain
from psynth_jax.model.transformer import Decoder
from psynth_jax.synthesis.branches import assemble, extract_branches, reencode
from psynth_jax.synthesis.mapper import Mapper, affine_scalars, map_caches

Branches = BranchCaches | BranchView  # what a worker hands over: copied out, or viewed in place


def shard_branches(branches: BranchCaches, rules: Rules) -> BranchCaches:
    """Requests over the batch axes, KV heads over tensor (a no-op without a context mesh)."""
    return dataclasses.replace(branches, k=constrain(branches.k, BRANCH_AXES, rules),
                               v=constrain(branches.v, BRANCH_AXES, rules))


# ------------------------------------------------------------------------------ pure functions
def extract(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *, num_requests: int,
            branch_slots: int, rules: Rules | None = None) -> BranchCaches:
    """Worker cache rows (B*K, request-major) -> BranchCaches holding slots [kept_start, + kept_len).

    offsets [B*K]: each row's worker prompt length P (its keys are re-encoded by -P).
    """
    out = extract_branches(cache, kept_start, kept_len, offsets, num_requests=num_requests,
                           branch_slots=branch_slots)
    return shard_branches(out, rules) if rules is not None else out


def view(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *,
         num_requests: int) -> BranchView:
    """Worker cache rows (B*K, request-major) as a BranchView of slots [kept_start, + kept_len):
    the rows themselves, not a copy; identity mapper until `prepare`. Cheap enough to call
    unjitted (a jit would have to return the worker cache as a new buffer).

    offsets [B*K]: each row's worker prompt length P (the RoPE shift the attention folds in).
    """
    shape = (num_requests, -1)
    start = kept_start.reshape(shape).astype(jnp.int32)
    ones = jnp.ones((cache.k.shape[0],) + start.shape + (cache.k.shape[3],), jnp.float32)
    return BranchView(k=cache.k, v=cache.v, starts=start, lengths=kept_len.reshape(shape).astype(jnp.int32),
                      offsets=offsets.reshape(shape).astype(jnp.int32), k_scale=ones, k_shift=jnp.zeros_like(ones),
                      v_scale=ones, v_shift=jnp.zeros_like(ones))


def hand_over(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *,
              num_requests: int, branch_slots: int, zero_copy: bool = False, rules: Rules | None = None) -> Branches:
    """Worker cache rows (B*K, request-major) handed to the synthesizer at slots [kept_start, + kept_len):
    viewed in place (`zero_copy`: `view`) or copied out into `branch_slots` per branch (`extract`).

    offsets [B*K]: each row's worker prompt length P (the RoPE shift the keys need).
    """
    if zero_copy:
        return view(cache, kept_start, kept_len, offsets, num_requests=num_requests)
    return extract(cache, kept_start, kept_len, offsets, num_requests=num_requests, branch_slots=branch_slots,
                   rules=rules)


def branch_kv(model: Decoder, rows: jax.Array, row_len: jax.Array, kept_start: jax.Array, kept_len: jax.Array,
              offsets: jax.Array, *, num_requests: int, branch_slots: int, zero_copy: bool = False,
              attn_impl: str = "xla", remat: bool = False) -> Branches:
    """Prefill worker rows [B*K, T] = [worker prompt | output] with the frozen backbone (LoRA off)
    and hand over each row's span (`hand_over`): what the worker held in memory, rebuilt from its tokens.

    No gradient flows into the kept KV (the backbone is frozen; the workers are not trained).
    """
    cache = model.empty_cache(rows.shape[0], rows.shape[1])
    _, cache = model(rows, cache, runtime.lengths_mask(row_len, rows.shape[1]), lora=False, attn_impl=attn_impl,
                     output="hidden", remat=remat)
    return hand_over(jax.lax.stop_gradient(cache), kept_start, kept_len, offsets, num_requests=num_requests,
                     branch_slots=branch_slots, zero_copy=zero_copy, rules=model.rules)


def prepare(mapper: Mapper, branches: Branches, cfg: ModelConfig, extra_slots: int
            ) -> tuple[KVCache, BranchView | None]:
    """What the synthesizer starts from (differentiable in the mapper): (its cache, None) from
    BranchCaches (`materialise`), or, from a BranchView, (an empty cache of `extra_slots` for its own
    tokens, its positions starting at max_i L_i as after the materialised branch region; the view
    carrying the mapper's scalars per (layer, request, branch, KV head)). The latter reads and
    writes no branch K/V: its cost does not grow with the branches' length."""
    if isinstance(branches, BranchView):
        scalars, live = _view_parts(mapper, branches.lengths, cfg, extra_slots, branches.k.shape[3],
                                    branches.k.dtype)
        return live, dataclasses.replace(branches, **scalars)
    return materialise(mapper, branches, cfg, extra_slots), None


def materialise(mapper: Mapper, branches: BranchCaches, cfg: ModelConfig, extra_slots: int) -> KVCache:
    """Re-encode, map and assemble branch caches into the synthesizer's KVCache (differentiable in
    the mapper): the "cache preparation" part of the materialised cache path's TTFT."""
    branches = reencode(branches, cfg)
    k, v = map_caches(mapper, branches.k, branches.v, branches.lengths)
    return assemble(dataclasses.replace(branches, k=k, v=v), extra_slots)


def _view_parts(mapper: Mapper, lengths: jax.Array, cfg: ModelConfig, extra_slots: int, num_kv_heads: int,
                dtype: jnp.dtype) -> tuple[dict[str, jax.Array], KVCache]:
    """`prepare`'s arrays of a view: the four mapper scalars [L, B, K, Hkv] and the synthesizer's empty cache."""
    ak, bk, av, bv = (jnp.broadcast_to(x, x.shape[:-1] + (num_kv_heads,)).astype(jnp.float32)
                      for x in affine_scalars(mapper, lengths, cfg.num_layers))
    live = KVCache.zeros(cfg, lengths.shape[0], extra_slots, dtype)
    live = dataclasses.replace(live, next_pos=jnp.max(lengths, axis=1).astype(jnp.int32))
    return dict(k_scale=ak, k_shift=bk, v_scale=av, v_shift=bv), live


def cache_prefill(model: Decoder, cache: KVCache, tokens: jax.Array, lengths: jax.Array, *, lora: bool = True,
                  attn_impl: str = "xla", remat: bool = False, view: BranchView | None = None
                  ) -> tuple[jax.Array, KVCache]:
    """The synthesizer prompt [B, T] over the prepared cache, LoRA on: hidden states [B, T, D] and
    the cache with the prompt written (`runtime.extend_fn`). view: the zero-copy path's mapped
    BranchView (then `cache` holds only the synthesizer's own tokens, from `prepare`)."""
    return runtime.extend_fn(model, cache, tokens, lengths, lora=lora, attn_impl=attn_impl, remat=remat, view=view)


# ------------------------------------------------------------------------------- jitted entries
@functools.partial(jax.jit, static_argnames=("graphdef", "num_requests", "branch_slots", "zero_copy", "attn_impl"))
def jit_branch_kv(graphdef: nnx.GraphDef, state: nnx.State, rows: jax.Array, row_len: jax.Array,
                  kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *, num_requests: int,
                  branch_slots: int, zero_copy: bool = False, attn_impl: str = "xla") -> Branches:
    """`branch_kv`, compiled once per (rows shape, branch_slots)."""
    return branch_kv(nnx.merge(graphdef, state), rows, row_len, kept_start, kept_len, offsets,
                     num_requests=num_requests, branch_slots=branch_slots, zero_copy=zero_copy, attn_impl=attn_impl)


def jit_hand_over(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *,
                  num_requests: int, branch_slots: int, zero_copy: bool = False, rules: Rules | None = None) -> Branches:
    """`hand_over`: the copy compiled once per (cache shape, branch_slots); the view unjitted (a jit
    would have to return the worker rows as new buffers)."""
    if zero_copy:
        return view(cache, kept_start, kept_len, offsets, num_requests=num_requests)
    return jit_extract(cache, kept_start, kept_len, offsets, num_requests=num_requests, branch_slots=branch_slots,
                       rules=rules)


@functools.partial(jax.jit, static_argnames=("num_requests", "branch_slots", "rules"))
def jit_extract(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *,
                num_requests: int, branch_slots: int, rules: Rules | None = None) -> BranchCaches:
    """`extract`, compiled once per (cache shape, branch_slots): the copying handoff (`jit_hand_over`)."""
    return extract(cache, kept_start, kept_len, offsets, num_requests=num_requests, branch_slots=branch_slots,
                   rules=rules)


def jit_prepare(branches: Branches, mapper_def: nnx.GraphDef, mapper_state: nnx.State, *, cfg: ModelConfig,
                extra_slots: int) -> tuple[KVCache, BranchView | None]:
    """`prepare`, compiled once per branch shape. For a view only the branch lengths enter the jit:
    a jit that returned the worker rows it was given would hand back copies of them."""
    if isinstance(branches, BranchView):
        scalars, live = _jit_view_parts(branches.lengths, mapper_def, mapper_state, cfg=cfg, extra_slots=extra_slots,
                                        num_kv_heads=branches.k.shape[3], dtype=branches.k.dtype)
        return live, dataclasses.replace(branches, **scalars)
    return jit_materialise(branches, mapper_def, mapper_state, cfg=cfg, extra_slots=extra_slots), None


@functools.partial(jax.jit, static_argnames=("cfg", "mapper_def", "extra_slots"))
def jit_materialise(branches: BranchCaches, mapper_def: nnx.GraphDef, mapper_state: nnx.State, *, cfg: ModelConfig,
                    extra_slots: int) -> KVCache:
    """`materialise`, compiled once per branch shape: the copying path's preparation (`jit_prepare`)."""
    return materialise(nnx.merge(mapper_def, mapper_state), branches, cfg, extra_slots)


def jit_cache_prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                      cache: KVCache, *, lora: bool = True, attn_impl: str = "xla", output: str = "last",
                      view: BranchView | None = None) -> tuple[jax.Array, KVCache]:
    """`cache_prefill` + `runtime.select_outputs`, compiled once per shape (`runtime.extend`, LoRA on by
    default); the prepared cache is donated (a view is only read)."""
    return runtime.extend(graphdef, state, tokens, lengths, cache, lora=lora, attn_impl=attn_impl, output=output,
                          view=view)


@functools.partial(jax.jit, static_argnames=("mapper_def", "cfg", "extra_slots", "num_kv_heads", "dtype"))
def _jit_view_parts(lengths: jax.Array, mapper_def: nnx.GraphDef, mapper_state: nnx.State, *, cfg: ModelConfig,
                    extra_slots: int, num_kv_heads: int, dtype: jnp.dtype) -> tuple[dict[str, jax.Array], KVCache]:
    return _view_parts(nnx.merge(mapper_def, mapper_state), lengths, cfg, extra_slots, num_kv_heads, dtype)
