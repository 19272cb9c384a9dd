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

The two prefills are the runtime's LM primitives (`runtime.extend_fn` / `prefill_fn`, jitted as
`runtime.extend` / `prefill`): the cache path is `extend` over a prepared cache, LoRA on.

Which span of a worker row is kept, and where its keys are moved, is the handoff convention's
(synthesis/convention.py): callers pass `kept_start`, `kept_len` and the RoPE offset P per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.model.sharding import Rules, constrain
from psynth_jax.model.transformer import Decoder
from psynth_jax.synthesis.handoff import BranchCaches, assemble, extract_branches, reencode
from psynth_jax.synthesis.mapper import Mapper, map_caches

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


def cache_prefill(model: Decoder, cache: KVCache, tokens: jax.Array, lengths: jax.Array, *, lora: bool = True,
                  attn_impl: str = "xla", remat: bool = False) -> tuple[jax.Array, KVCache]:
    """The synthesizer prompt [B, T] over the prepared cache, LoRA on: hidden states [B, T, D] and
    the cache with the prompt written (`runtime.extend_fn`)."""
    return runtime.extend_fn(model, cache, tokens, lengths, lora=lora, attn_impl=attn_impl, remat=remat)


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
                      cache: KVCache, *, lora: bool = True, attn_impl: str = "xla", output: str = "last"
                      ) -> tuple[jax.Array, KVCache]:
    """`cache_prefill` + `runtime.select_outputs`, compiled once per shape (`runtime.extend`, LoRA on by
    default); the prepared cache is donated."""
    return runtime.extend(graphdef, state, tokens, lengths, cache, lora=lora, attn_impl=attn_impl, output=output)


jit_text_prefill = runtime.prefill  # text_prefill + runtime.select_outputs (LoRA off)
