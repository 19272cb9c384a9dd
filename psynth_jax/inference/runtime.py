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
from psynth_jax.model.kv_cache import KVCache
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
    """Prompts [B, T] right-padded to T with true lengths [B] -> (logits, fresh cache).

    The cache has `num_slots` slots (>= T), room for the tokens decoded afterwards.
    """
    model = _merge(graphdef, state)
    cache = KVCache.zeros(model.cfg, tokens.shape[0], num_slots, model.dtype)
    valid = lengths_mask(lengths, tokens.shape[1])
    return model(tokens, cache, valid, lora=lora, attn_impl=attn_impl, output=output)


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
    """Feed one token per row ([B]); rows with active=False are left unchanged. Donates cache."""
    model = _merge(graphdef, state)
    valid = None if active is None else active[:, None]
    return model(tokens[:, None], cache, valid, lora=lora, attn_impl=attn_impl, output="last")


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
) -> Generation:
    """Sample up to `max_new_tokens` tokens after a prefill, feeding each one back in.

    Runs inside the caller's jit. Every generated token, the final one included, is written to
    the cache, so the cache ends holding the whole output (what worker branches hand over).
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
        logits, cache = model(cur[:, None], cache, (~done)[:, None], lora=lora, attn_impl=attn_impl, output="last")
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
    cache = KVCache.zeros(model.cfg, tokens.shape[0], num_slots, model.dtype)
    valid = lengths_mask(lengths, tokens.shape[1])
    logits, cache = model(tokens, cache, valid, lora=lora, attn_impl=attn_impl, output="last")
    return decode_loop(
        model, logits, cache, rng, max_new_tokens=max_new_tokens, sampling=sampling,
        stop_ids=stop_ids, lora=lora, attn_impl=attn_impl,
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "lora", "attn_impl"), donate_argnames=("cache",)
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
) -> tuple[jax.Array, KVCache]:
    """Prefill right-padded chunks [B, T] (true lengths [B]) after what `cache` holds.

    Returns the logits of each row's last valid token [B, V] and the cache. This is the
    synthesizer prefill of the cache path: the prompt follows the assembled branch caches.
    """
    model = _merge(graphdef, state)
    valid = lengths_mask(lengths, tokens.shape[1])
    return model(tokens, cache, valid, lora=lora, attn_impl=attn_impl, output="last")


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
) -> Generation:
    """Decode from the logits a prefill/extend returned (the token loop inside jit)."""
    model = _merge(graphdef, state)
    return decode_loop(
        model, first_logits, cache, rng, max_new_tokens=max_new_tokens, sampling=sampling,
        stop_ids=stop_ids, lora=lora, attn_impl=attn_impl,
    )


first_token = jax.jit(sample, static_argnames=("cfg",))
