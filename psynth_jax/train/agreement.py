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

from psynth_jax.inference.runtime import decode_loop, lengths_mask
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.train.objective import branch_caches, merge_trainable, synth_cache


def _prompt_len(mask: jax.Array) -> jax.Array:
    """Prompt length = index of the first target-predicting position + 1."""
    return (jnp.argmax(mask > 0, axis=1) + 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_new_tokens", "stop_ids", "attn_impl"))
def greedy_both_paths(graphdefs, trainable, frozen, batch, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                      attn_impl: str = "xla"):
    """Greedy tokens [B, N] and counts [B] of the cache path and of the text path."""
    model, mapper = merge_trainable(graphdefs, trainable, frozen)
    greedy = SamplingConfig()
    key = jax.random.key(0)

    def decode(tokens, lengths, cache, lora):
        logits, cache = model(tokens, cache, lengths_mask(lengths, tokens.shape[1]), lora=lora, attn_impl=attn_impl, output="last")
        return decode_loop(model, logits, cache, key, max_new_tokens=max_new_tokens, sampling=greedy,
                           stop_ids=stop_ids, lora=lora, attn_impl=attn_impl)

    ts = batch["synth_tokens"].shape[1]
    cache = synth_cache(mapper, branch_caches(model, batch, attn_impl), model.cfg, ts + max_new_tokens)
    cached = decode(batch["synth_tokens"], _prompt_len(batch["loss_mask"]), cache, True)
    tt = batch["text_tokens"].shape[1]
    fresh = KVCache.zeros(model.cfg, batch["text_tokens"].shape[0], tt + max_new_tokens, model.dtype)
    text = decode(batch["text_tokens"], _prompt_len(batch["text_loss_mask"]), fresh, False)
    return cached.tokens, cached.num_tokens, text.tokens, text.num_tokens


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
