"""Token sampling: greedy, temperature and nucleus (top-p), all inside jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_p 1.0 disables nucleus filtering."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):  # nan and inf too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:  # nan too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        logits = jnp.where(nucleus(logits, cfg.top_p), logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Each row with its own settings and key (a serving batch mixes requests): logits [B, V]
    float32, keys [B] (typed PRNG keys), temperature [B] (0: greedy), top_p [B] -> token ids [B].

    A row is drawn from the distribution `sample` draws from under a SamplingConfig of its settings
    (greedy rows: the same token), from its own key only, so a row's tokens do not depend on the
    other rows of its batch. The nucleus and the draw are skipped (`lax.cond`) when no row of the batch needs them, so an all-greedy batch
    costs one argmax.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warm = temperature > 0.0

    def drawn() -> jax.Array:
        scaled = logits / jnp.where(warm, temperature, 1.0)[:, None]
        cut = warm & (top_p < 1.0)
        scaled = jax.lax.cond(
            jnp.any(cut), lambda x: jnp.where(nucleus(x, top_p) | ~cut[:, None], x, -jnp.inf), lambda x: x, scaled)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled).astype(jnp.int32)

    return jnp.where(warm, jax.lax.cond(jnp.any(warm), drawn, lambda: greedy), greedy)


def nucleus(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """[B, V] -> bool [B, V]: the top-p nucleus, the smallest set of highest logits whose
    probability mass reaches top_p (a scalar, or one per row [B]; ties at the cutoff kept; never empty).

    The cutoff is the largest logit c with P(logit >= c) >= top_p. It is found by bisection
    over the 2^32 float32 values in order (their bit patterns, made monotonic), 32 masked sums
    over the vocabulary, instead of sorting it: a sort of a 49k-32k vocabulary per row per step
    cost more than the model's forward pass on CPU.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    key = ordered_bits(logits)
    lo = jnp.min(key, axis=-1)  # mass(>= lo) = 1 >= top_p
    hi = jnp.max(key, axis=-1) + jnp.uint32(1)  # mass(>= hi) = 0 < top_p (finite logits)

    def mass(t: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(key >= t[:, None], probs, 0.0), axis=-1)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // jnp.uint32(2)
        enough = mass(mid) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return key >= lo[:, None]


def ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (a <= b iff bits(a) <= bits(b); -0.0 < 0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
