"""The synthesis core: the cache path and the text path as pure functions, each also jitted.

Every consumer computes Parallel-Synthesis through these and nothing else: inference
(`ParallelSynthesis`), the training objective (student and KL teacher), the agreement metric,
evaluation and the benchmarks. The pure functions take a merged `Decoder` (and `Mapper`) and
arrays, so the train step can differentiate through them inside its own jit; the `jit_*`
wrappers take the model as (graphdef, state) and compile once per shape bucket.

    branch_kv      worker rows [prompt | output] (LoRA off, frozen) -> BranchCaches of the kept spans
    extract        a worker decode cache -> BranchCaches of the kept spans (no recompute)
    prepare        re-encode (RoPE by -P_i) + map + assemble -> the synthesizer's KVCache
    cache_prefill  the synthesizer prompt over [branch caches | prompt] (LoRA on)
    text_prefill   the text-concatenation prompt from scratch (LoRA off)
    decode         runtime.continue_generation from a prefill's last logits

The zero-copy cache path (the materialised one above is its reference, equal up to rounding):

    branch_view    worker rows prefilled as in branch_kv -> a BranchView of the kept spans, in place
    view           a worker decode cache -> a BranchView of the kept spans (no copy)
    prepare_view   the mapper's per-(layer, branch) scalars + an empty cache for the synthesizer's
                   own tokens: no branch K/V is read, copied or written
    cache_prefill / decode with `view=`: the attention reads the worker rows where they are and
                   folds the re-encoding and the mapper into the queries and the softmax
                   (model/attention.py view_block); XLA attention only

The two prefills are the runtime's LM primitives (`runtime.extend_fn` / `prefill_fn`, jitted as
`runtime.extend` / `prefill`): the cache path is `extend` over a prepared cache, LoRA on.

Which span of a worker row is kept, and where its keys are moved, is the handoff convention's
(synthesis/convention.py): callers pass `kept_start`, `kept_len` and the RoPE offset P per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import BranchView, KVCache
from psynth_jax.model.sharding import Rules, constrain
from psynth_jax.model.transformer import Decoder
from psynth_jax.synthesis.handoff import BranchCaches, assemble, extract_branches, reencode
from psynth_jax.synthesis.mapper import Mapper, affine_scalars, map_caches

decode = runtime.continue_generation  # jitted: sample the answer after a prefill (cache donated)
decode_loop = runtime.decode_loop  # the same token loop, pure (inside a caller's jit)
BRANCH_AXES = ("layers", "batch", None, "cache_slots", "kv_heads", "head_dim")  # BranchCaches.k / .v


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


def branch_kv(model: Decoder, rows: jax.Array, row_len: jax.Array, kept_start: jax.Array, kept_len: jax.Array,
              offsets: jax.Array, *, num_requests: int, branch_slots: int, attn_impl: str = "xla",
              remat: bool = False) -> BranchCaches:
    """Prefill worker rows [B*K, T] = [worker prompt | output] with the frozen backbone (LoRA off)
    and keep each row's span: what the worker held in memory, rebuilt from its tokens.

    No gradient flows into the kept KV (the backbone is frozen; the workers are not trained).
    """
    cache = model.empty_cache(rows.shape[0], rows.shape[1])
    _, cache = model(rows, cache, runtime.lengths_mask(row_len, rows.shape[1]), lora=False, attn_impl=attn_impl,
                     output="hidden", remat=remat)
    cache = jax.lax.stop_gradient(cache)
    return extract(cache, kept_start, kept_len, offsets, num_requests=num_requests, branch_slots=branch_slots,
                   rules=model.rules)


def prepare(mapper: Mapper, branches: BranchCaches, cfg: ModelConfig, extra_slots: int) -> KVCache:
    """Re-encode, map and assemble branch caches into the synthesizer's KVCache (differentiable in
    the mapper): the "cache preparation" part of the cache path's TTFT."""
    branches = reencode(branches, cfg)
    k, v = map_caches(mapper, branches.k, branches.v, branches.lengths)
    return assemble(dataclasses.replace(branches, k=k, v=v), extra_slots)


def view(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *,
         num_requests: int) -> BranchView:
    """Worker cache rows (B*K, request-major) as a BranchView of slots [kept_start, + kept_len):
    the rows themselves, not a copy; identity mapper until `prepare_view`. Cheap enough to call
    unjitted (a jit would have to return the worker cache as a new buffer).

    offsets [B*K]: each row's worker prompt length P (the RoPE shift the attention folds in).
    """
    shape = (num_requests, -1)
    start = kept_start.reshape(shape).astype(jnp.int32)
    ones = jnp.ones((cache.k.shape[0],) + start.shape + (cache.k.shape[3],), jnp.float32)
    return BranchView(k=cache.k, v=cache.v, starts=start, lengths=kept_len.reshape(shape).astype(jnp.int32),
                      offsets=offsets.reshape(shape).astype(jnp.int32), k_scale=ones, k_shift=jnp.zeros_like(ones),
                      v_scale=ones, v_shift=jnp.zeros_like(ones))


def branch_view(model: Decoder, rows: jax.Array, row_len: jax.Array, kept_start: jax.Array, kept_len: jax.Array,
                offsets: jax.Array, *, num_requests: int, attn_impl: str = "xla", remat: bool = False) -> BranchView:
    """`branch_kv` without the copy: the prefilled worker rows themselves, viewed at their kept spans."""
    cache = model.empty_cache(rows.shape[0], rows.shape[1])
    _, cache = model(rows, cache, runtime.lengths_mask(row_len, rows.shape[1]), lora=False, attn_impl=attn_impl,
                     output="hidden", remat=remat)
    return view(jax.lax.stop_gradient(cache), kept_start, kept_len, offsets, num_requests=num_requests)


def prepare_view(mapper: Mapper, branches: BranchView, cfg: ModelConfig, extra_slots: int
                 ) -> tuple[BranchView, KVCache]:
    """The zero-copy preparation: the mapper's scalars per (layer, request, branch, KV head)
    (differentiable in the mapper) and an empty cache of `extra_slots` for the synthesizer's own
    tokens, its positions starting at max_i L_i as after the materialised branch region. Reads
    and writes no branch K/V: its cost does not grow with the branches' length."""
    scalars, live = _view_parts(mapper, branches.lengths, cfg, extra_slots, branches.k.shape[3], branches.k.dtype)
    return dataclasses.replace(branches, **scalars), live


def _view_parts(mapper: Mapper, lengths: jax.Array, cfg: ModelConfig, extra_slots: int, num_kv_heads: int,
                dtype: jnp.dtype) -> tuple[dict[str, jax.Array], KVCache]:
    """`prepare_view`'s arrays: the four mapper scalars [L, B, K, Hkv] and the synthesizer's empty cache."""
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
    BranchView (then `cache` holds only the synthesizer's own tokens, from `prepare_view`)."""
    return runtime.extend_fn(model, cache, tokens, lengths, lora=lora, attn_impl=attn_impl, remat=remat, view=view)


text_prefill = runtime.prefill_fn  # the text-concatenation prompt from scratch (LoRA off)


# ------------------------------------------------------------------------------- jitted entries
@functools.partial(jax.jit, static_argnames=("graphdef", "num_requests", "branch_slots", "attn_impl"))
def jit_branch_kv(graphdef: nnx.GraphDef, state: nnx.State, rows: jax.Array, row_len: jax.Array,
                  kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *, num_requests: int,
                  branch_slots: int, attn_impl: str = "xla") -> BranchCaches:
    """`branch_kv`, compiled once per (rows shape, branch_slots)."""
    return branch_kv(nnx.merge(graphdef, state), rows, row_len, kept_start, kept_len, offsets,
                     num_requests=num_requests, branch_slots=branch_slots, attn_impl=attn_impl)


@functools.partial(jax.jit, static_argnames=("num_requests", "branch_slots", "rules"))
def jit_extract(cache: KVCache, kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *,
                num_requests: int, branch_slots: int, rules: Rules | None = None) -> BranchCaches:
    """`extract`, compiled once per (cache shape, branch_slots)."""
    return extract(cache, kept_start, kept_len, offsets, num_requests=num_requests, branch_slots=branch_slots,
                   rules=rules)


@functools.partial(jax.jit, static_argnames=("cfg", "mapper_def", "extra_slots"))
def jit_prepare(branches: BranchCaches, mapper_def: nnx.GraphDef, mapper_state: nnx.State, *, cfg: ModelConfig,
                extra_slots: int) -> KVCache:
    """`prepare`, compiled once per branch shape."""
    return prepare(nnx.merge(mapper_def, mapper_state), branches, cfg, extra_slots)


def jit_cache_prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                      cache: KVCache, *, lora: bool = True, attn_impl: str = "xla", output: str = "last",
                      view: BranchView | None = None) -> tuple[jax.Array, KVCache]:
    """`cache_prefill` + `runtime.select_outputs`, compiled once per shape (`runtime.extend`, LoRA on by
    default); the prepared cache is donated (a view is only read)."""
    return runtime.extend(graphdef, state, tokens, lengths, cache, lora=lora, attn_impl=attn_impl, output=output,
                          view=view)


jit_text_prefill = runtime.prefill  # text_prefill + runtime.select_outputs (LoRA off)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_requests", "attn_impl"))
def jit_branch_view(graphdef: nnx.GraphDef, state: nnx.State, rows: jax.Array, row_len: jax.Array,
                    kept_start: jax.Array, kept_len: jax.Array, offsets: jax.Array, *, num_requests: int,
                    attn_impl: str = "xla") -> BranchView:
    """`branch_view`, compiled once per rows shape."""
    return branch_view(nnx.merge(graphdef, state), rows, row_len, kept_start, kept_len, offsets,
                       num_requests=num_requests, attn_impl=attn_impl)


def jit_prepare_view(branches: BranchView, mapper_def: nnx.GraphDef, mapper_state: nnx.State, *,
                     cfg: ModelConfig, extra_slots: int) -> tuple[BranchView, KVCache]:
    """`prepare_view`, compiled once per view shape. Only the branch lengths enter the jit: a jit
    that returned the worker rows it was given would hand back copies of them."""
    scalars, live = _jit_view_parts(branches.lengths, mapper_def, mapper_state, cfg=cfg, extra_slots=extra_slots,
                                    num_kv_heads=branches.k.shape[3], dtype=branches.k.dtype)
    return dataclasses.replace(branches, **scalars), live


@functools.partial(jax.jit, static_argnames=("mapper_def", "cfg", "extra_slots", "num_kv_heads", "dtype"))
def _jit_view_parts(lengths: jax.Array, mapper_def: nnx.GraphDef, mapper_state: nnx.State, *, cfg: ModelConfig,
                    extra_slots: int, num_kv_heads: int, dtype: jnp.dtype) -> tuple[dict[str, jax.Array], KVCache]:
    return _view_parts(nnx.merge(mapper_def, mapper_state), lengths, cfg, extra_slots, num_kv_heads, dtype)
