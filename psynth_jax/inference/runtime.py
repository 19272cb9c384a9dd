"""The pure, jitted functional core: forward, prefill, decode_step and generate.

Every function takes the model as (graphdef, state) from `nnx.split`: the graphdef is static
(hashable), the state is a pytree of arrays. Each is compiled once per shape bucket and static
option set. The token loop of `generate` runs inside jit (`lax.while_loop`), not one host round
trip per token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.inference.sampling import SamplingConfig, sample
from psynth_jax.model.kv_cache import BranchView, KVCache
from psynth_jax.model.transformer import Decoder, Output


def _merge(graphdef: nnx.GraphDef, state: nnx.State) -> Decoder:
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "lora", "attn_impl", "output"))
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    cache: KVCache,
    token_valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    lora: bool = False,
    attn_impl: str = "xla",
    output: Output = "all",
) -> tuple[jax.Array, KVCache]:
    """One model call on `tokens` [B, T] after what `cache` holds (see Decoder.__call__)."""
    model = _merge(graphdef, state)
    return model(tokens, cache, token_valid, positions, lora=lora, attn_impl=attn_impl, output=output)


def lengths_mask(lengths: jax.Array, width: int) -> jax.Array:
    """[B] lengths -> [B, width] bool, True for the first lengths[b] entries of each row."""
    return jnp.arange(width, dtype=jnp.int32)[None, :] < lengths[:, None]


def extend_fn(model: Decoder, cache: KVCache, tokens: jax.Array, lengths: jax.Array, *, lora: bool = False,
              attn_impl: str = "xla", remat: bool = False, view: BranchView | None = None) -> tuple[jax.Array, KVCache]:
    """Right-padded chunks [B, T] (true lengths [B]) after what `cache` holds: final-norm hidden
    states [B, T, D] and the cache with the chunk written (pure: callable inside any jit).

    view: branch caches read in place besides `cache` (the zero-copy cache path)."""
    return model(tokens, model.shard_cache(cache), lengths_mask(lengths, tokens.shape[1]), lora=lora,
                 attn_impl=attn_impl, output="hidden", remat=remat, view=view)


def prefill_fn(model: Decoder, tokens: jax.Array, lengths: jax.Array, *, num_slots: int, lora: bool = False,
               attn_impl: str = "xla", remat: bool = False) -> tuple[jax.Array, KVCache]:
    """Prompts [B, T] from an empty cache of `num_slots` (>= T) slots: hidden states and the cache."""
    return extend_fn(model, model.empty_cache(tokens.shape[0], num_slots), tokens, lengths, lora=lora,
                     attn_impl=attn_impl, remat=remat)


def select_outputs(model: Decoder, hidden: jax.Array, lengths: jax.Array, output: Output, attn_impl: str = "xla"
                   ) -> jax.Array:
    """A prefill's outputs: "last" -> float32 logits of each row's last valid token [B, V] (the LM
    head sees one position per row), "all" -> logits [B, T, V], "hidden" -> the hidden states."""
    if output == "hidden":
        return hidden
    if output == "last":
        hidden = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(hidden, attn_impl=attn_impl)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "num_slots", "lora", "attn_impl", "output")
)
def prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    num_slots: int,
    lora: bool = False,
    attn_impl: str = "xla",
    output: Output = "last",
) -> tuple[jax.Array, KVCache]:
    """`prefill_fn` + `select_outputs`, compiled once per shape: prompts [B, T] right-padded, true
    lengths [B] -> (outputs, a fresh cache of `num_slots` slots with room to decode)."""
    model = _merge(graphdef, state)
    h, cache = prefill_fn(model, tokens, lengths, num_slots=num_slots, lora=lora, attn_impl=attn_impl)
    return select_outputs(model, h, lengths, output, attn_impl), cache


def decode_fn(model: Decoder, tokens: jax.Array, cache: KVCache, active: jax.Array | None = None, *,
              lora: bool | jax.Array = False, attn_impl: str = "xla", view: BranchView | None = None
              ) -> tuple[jax.Array, KVCache]:
    """One decode step (pure: callable inside any jit): feed one token per row ([B]) and return
    float32 logits [B, V] and the cache with it written; rows with active=False are left unchanged.

    lora: on or off for every row, or a [B] bool array (a serving batch mixes workers and
    synthesizers). view: branch caches read in place besides `cache` (the zero-copy cache path).
    """
    valid = None if active is None else active[:, None]
    return model(tokens[:, None], cache, valid, lora=lora, attn_impl=attn_impl, output="last", view=view)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "lora", "attn_impl"), donate_argnames=("cache",)
)
def decode_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    cache: KVCache,
    active: jax.Array | None = None,
    *,
    lora: bool = False,
    attn_impl: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """`decode_fn` compiled: feed one token per row ([B]); rows with active=False are left unchanged. Donates cache."""
    return decode_fn(_merge(graphdef, state), tokens, cache, active, lora=lora, attn_impl=attn_impl)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    tokens: jax.Array  # [B, max_new_tokens] int32, 0 after a row's end
    num_tokens: jax.Array  # [B] generated tokens, a final stop token included
    stopped: jax.Array  # [B] bool: the row ended on a stop token
    cache: KVCache  # prompt + every generated token (stop token included)


def decode_loop(
    model: Decoder,
    first_logits: jax.Array,
    cache: KVCache,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop_ids: tuple[int, ...],
    lora: bool,
    attn_impl: str,
    view: BranchView | None = None,
) -> Generation:
    """Sample up to `max_new_tokens` tokens after a prefill, feeding each one back in.

    Runs inside the caller's jit. Every generated token, the final one included, is written to
    the cache, so the cache ends holding the whole output (what worker branches hand over).
    view: branch caches every step also reads in place (the zero-copy cache path).
    """
    b = first_logits.shape[0]
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    rng, sub = jax.random.split(rng)
    first = sample(first_logits, sub, sampling)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def cond(carry):
        i, _, done, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cur, done, out, cache, rng = carry
        logits, cache = decode_fn(model, cur, cache, ~done, lora=lora, attn_impl=attn_impl, view=view)
        finished = done | jnp.isin(cur, stops) | (i + 1 >= max_new_tokens)
        rng, sub = jax.random.split(rng)
        nxt = jnp.where(finished, 0, sample(logits, sub, sampling))
        written = jax.lax.dynamic_update_slice_in_dim(
            out, nxt[:, None], jnp.minimum(i + 1, max_new_tokens - 1), axis=1
        )
        out = jnp.where(i + 1 < max_new_tokens, written, out)
        return i + 1, nxt, finished, out, cache, rng

    init = (jnp.int32(0), first, jnp.zeros((b,), bool), out, cache, rng)
    _, _, _, out, cache, _ = jax.lax.while_loop(cond, body, init)
    is_stop = jnp.isin(out, stops)
    pos = jnp.arange(max_new_tokens)[None, :]
    first_stop = jnp.min(jnp.where(is_stop, pos, max_new_tokens), axis=1)
    stopped = first_stop < max_new_tokens
    num = jnp.where(stopped, first_stop + 1, max_new_tokens).astype(jnp.int32)
    out = jnp.where(pos < num[:, None], out, 0)
    return Generation(tokens=out, num_tokens=num, stopped=stopped, cache=cache)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "sampling", "stop_ids", "num_slots", "lora", "attn_impl"),
)
def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: tuple[int, ...] = (),
    num_slots: int,
    lora: bool = False,
    attn_impl: str = "xla",
) -> Generation:
    """Batched generation from right-padded prompts [B, T] with true lengths [B]."""
    model = _merge(graphdef, state)
    h, cache = prefill_fn(model, tokens, lengths, num_slots=num_slots, lora=lora, attn_impl=attn_impl)
    return decode_loop(
        model, select_outputs(model, h, lengths, "last", attn_impl), cache, rng, max_new_tokens=max_new_tokens,
        sampling=sampling, stop_ids=stop_ids, lora=lora, attn_impl=attn_impl,
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "lora", "attn_impl", "output"), donate_argnames=("cache",)
)
def extend(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    cache: KVCache,
    *,
    lora: bool = False,
    attn_impl: str = "xla",
    output: Output = "last",
    view: BranchView | None = None,
) -> tuple[jax.Array, KVCache]:
    """`extend_fn` + `select_outputs`, compiled once per shape; the cache is donated (a view is not).

    The synthesizer prefill of the cache path: the prompt follows the assembled branch caches
    (or, with `view`, attends to the worker rows in place).
    """
    model = _merge(graphdef, state)
    h, cache = extend_fn(model, cache, tokens, lengths, lora=lora, attn_impl=attn_impl, view=view)
    return select_outputs(model, h, lengths, output, attn_impl), cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "sampling", "stop_ids", "lora", "attn_impl"),
    donate_argnames=("cache",),
)
def continue_generation(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    first_logits: jax.Array,
    cache: KVCache,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: tuple[int, ...] = (),
    lora: bool = False,
    attn_impl: str = "xla",
    view: BranchView | None = None,
) -> Generation:
    """Decode from the logits a prefill/extend returned (the token loop inside jit)."""
    model = _merge(graphdef, state)
    return decode_loop(
        model, first_logits, cache, rng, max_new_tokens=max_new_tokens, sampling=sampling,
        stop_ids=stop_ids, lora=lora, attn_impl=attn_impl, view=view,
    )


first_token = jax.jit(sample, static_argnames=("cfg",))
