"""Held-out greedy agreement: does the cache path say what the text path says?

For a batch in the trainer's contract, both paths decode greedily from their own prompt (the
cache path over the mapped branch caches with the LoRA on; the text path over every branch as
text with the LoRA off). Agreement of one example = fraction of the text path's tokens (up to its
stop, at most `max_new_tokens`) that the cache path reproduces at the same position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.synthesis import core
from psynth_jax.train.objective import ObjectiveConfig, merge_trainable, synthesizer_cache


def _prompt_len(mask: jax.Array) -> jax.Array:
    """Prompt length = index of the first target-predicting position + 1."""
    return (jnp.argmax(mask > 0, axis=1) + 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_new_tokens", "stop_ids", "opts"))
def greedy_both_paths(graphdefs, trainable, frozen, batch, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                      opts: ObjectiveConfig = ObjectiveConfig()):
    """Greedy tokens [B, N] and counts [B] of the cache path and of the text path (synthesis core)."""
    model, mapper = merge_trainable(graphdefs, trainable, frozen)
    greedy = SamplingConfig()
    key = jax.random.key(0)

    def decode(h, lengths, cache, lora, view=None):
        first = runtime.select_outputs(model, h, lengths, "last", opts.attn_impl)
        return runtime.decode_loop(model, first, cache, key, max_new_tokens=max_new_tokens, sampling=greedy,
                                   stop_ids=stop_ids, lora=lora, attn_impl=opts.attn_impl, view=view)

    tokens = batch["synth_tokens"]
    lengths = _prompt_len(batch["loss_mask"])
    cache, view = synthesizer_cache(model, mapper, batch, opts, tokens.shape[1] + max_new_tokens)
    h, cache = core.cache_prefill(model, cache, tokens, lengths, lora=True, attn_impl=opts.attn_impl, view=view)
    cached = decode(h, lengths, cache, True, view)
    text = batch["text_tokens"]
    text_len = _prompt_len(batch["text_loss_mask"])
    h, cache = runtime.prefill_fn(model, text, text_len, num_slots=text.shape[1] + max_new_tokens,
                                  attn_impl=opts.attn_impl)
    plain = decode(h, text_len, cache, False)
    return cached.tokens, cached.num_tokens, plain.tokens, plain.num_tokens


def agreement_rates(cache_tokens, cache_n, text_tokens, text_n, valid) -> list[float]:
    """Per valid example: share of the text path's tokens the cache path matches position-wise."""
    out = []
    for c, cn, t, tn, ok in zip(*(np.asarray(x) for x in (cache_tokens, cache_n, text_tokens, text_n, valid))):
        if not ok:
            continue
        n = max(int(tn), 1)
        m = min(int(cn), int(tn))
        out.append(float((c[:m] == t[:m]).sum()) / n)
    return out
