"""The training objective over the parallel-cache layout (METHOD.md section 5), on the synthesis core.

For a batch of B examples x K branches, through the same functions inference uses (synthesis/core.py):
1. `core.branch_kv`: the frozen backbone (LoRA off) prefills every branch's [worker prompt | output]
   and hands over the span the handoff convention keeps (no gradient flows into it);
2. `core.prepare`: re-encoding, the cache mapper and assembly build the synthesizer cache
   (gradient -> mapper);
3. `core.cache_prefill`: the synthesizer (LoRA on) runs teacher-forced over [prompt | target] on
   top of it (gradient -> LoRA); cross-entropy on target tokens only, prompt tokens masked.
Optionally a token-level KL to the text-concatenation teacher: `runtime.prefill_fn` (same backbone,
LoRA off, every branch as text) over the same target tokens.
With `zero_copy` the hand-over is a view (step 1) and the preparation the mapper's scalars (step 2):
the synthesizer attends to the prefilled branch rows in place, the mapper's scalars folded into its
attention (the gradient reaches the mapper through them), and no branch K/V is copied, mapped or
held twice.

The LM head never sees every position: the target positions are gathered first (they are
contiguous per row), then projected a chunk of `logit_chunk` positions at a time (an unrolled
loop of checkpointed chunks), rematerialised in the backward pass. So the float32
logits held at once are [B, logit_chunk, V], never [B, T, V], for the student and the teacher alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.model.kv_cache import BranchView, KVCache
from psynth_jax.model.transformer import Decoder, LoRAParam
from psynth_jax.synthesis import core
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import Mapper


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    ce_weight: float = 1.0
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    remat: bool = False
    attn_impl: str = "xla"
    handoff: Handoff = Handoff()
    logit_chunk: int = 128  # target positions projected to the vocabulary at a time
    zero_copy: bool = False  # the zero-copy cache path (core.hand_over); XLA attention only


def synthesizer_cache(model: Decoder, mapper: Mapper, batch: dict[str, jax.Array], opts: ObjectiveConfig,
                      extra_slots: int) -> tuple[KVCache, BranchView | None]:
    """What the synthesizer starts from (`core.prepare`): the prepared cache and no view, or
    (zero_copy) an empty cache of its own and the mapped view of the branch rows.

    The branches are batch rows [B, K, Tb] prefilled by the frozen backbone (`core.branch_kv`).
    Training branches are complete texts: each is taken to have ended on a stop token (what
    matters only to the "release" convention, which then keeps the last prompt token too).
    """
    b, k, tb = batch["branch_tokens"].shape
    prefix = batch["branch_prefix_len"].reshape(-1)
    out_len = batch["branch_len"].reshape(-1)
    start, kept = opts.handoff.kept_span(prefix, out_len, jnp.ones_like(out_len, bool))
    rows = batch["branch_tokens"].reshape(b * k, tb)
    branches = core.branch_kv(model, rows, prefix + out_len, start, kept, prefix, num_requests=b, branch_slots=tb,
                              zero_copy=opts.zero_copy, attn_impl=opts.attn_impl)
    return core.prepare(mapper, branches, model.cfg, extra_slots)


def student_hidden(model: Decoder, mapper: Mapper, batch: dict[str, jax.Array], opts: ObjectiveConfig) -> jax.Array:
    """Final-norm hidden states [B, Ts, D] of the synthesizer over [prompt | target] on the mapped caches."""
    tokens = batch["synth_tokens"]
    cache, view = synthesizer_cache(model, mapper, batch, opts, tokens.shape[1])
    h, _ = core.cache_prefill(model, cache, tokens, batch["synth_len"], lora=True, attn_impl=opts.attn_impl,
                              remat=opts.remat, view=view)
    return h


def teacher_hidden(model: Decoder, batch: dict[str, jax.Array], opts: ObjectiveConfig) -> jax.Array:
    """Final-norm hidden states [B, Tt, D] of the text-concatenation path (LoRA off, no gradient)."""
    text = batch["text_tokens"]
    h, _ = runtime.prefill_fn(model, text, batch["text_len"], num_slots=text.shape[1], lora=False,
                              attn_impl=opts.attn_impl, remat=opts.remat)
    return jax.lax.stop_gradient(h)


def _targets(h: jax.Array, tokens: jax.Array, mask: jax.Array, width: int) -> tuple[jax.Array, ...]:
    """Gather each row's target-predicting positions (contiguous, where mask > 0) to the front.

    Returns hidden [B, W, D], target ids [B, W] (the token each position predicts) and the valid
    mask [B, W], W = `width` (padded: positions past a row's count are masked).
    """
    t = tokens.shape[1]
    start = jnp.argmax(mask > 0, axis=1)
    count = (mask > 0).sum(axis=1)
    idx = jnp.minimum(start[:, None] + jnp.arange(width)[None, :], t - 1)
    hg = jnp.take_along_axis(h, idx[..., None], axis=1)
    ids = jnp.take_along_axis(tokens, jnp.minimum(idx + 1, t - 1), axis=1)
    return hg, ids, jnp.arange(width)[None, :] < count[:, None]


def synthesis_loss(
    model: Decoder, mapper: Mapper, batch: dict[str, jax.Array], opts: ObjectiveConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted CE (+ KL) over target tokens; returns (loss, metrics)."""
    tokens = batch["synth_tokens"]
    ts = tokens.shape[1]
    chunk = max(1, min(opts.logit_chunk, ts))
    width = -(-ts // chunk) * chunk
    mask = batch["loss_mask"] * batch["example_valid"][:, None].astype(jnp.float32)
    hs, ids, valid = _targets(student_hidden(model, mapper, batch, opts), tokens, mask, width)
    use_kl = opts.kl_weight > 0
    if use_kl:
        tmask = batch["text_loss_mask"] * batch["example_valid"][:, None].astype(jnp.float32)
        ht, _, _ = _targets(teacher_hidden(model, batch, opts), batch["text_tokens"], tmask, width)
    else:
        ht = jnp.zeros((hs.shape[0], width, 0), hs.dtype)
    tmp = opts.kl_temperature
    head = model.head_weight()  # gathered once for every chunk, forward and backward

    @jax.checkpoint
    def chunk_terms(head, hs_c, ht_c, ids_c, valid_c):
        logits = model.logits(hs_c, head)  # [B, C, V] float32
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -(jnp.take_along_axis(logp, ids_c[..., None], axis=-1)[..., 0] * valid_c).sum()
        if not use_kl:
            return nll, jnp.float32(0.0)
        p_t = jax.nn.log_softmax(model.logits(ht_c, head) / tmp, axis=-1)
        p_s = jax.nn.log_softmax(logits / tmp, axis=-1)
        kl = ((jnp.exp(p_t) * (p_t - p_s)).sum(-1) * valid_c).sum()
        return nll, kl

    # A Python loop over the (static) chunks, neither a scan nor conditionals: a scan's backward
    # stacks the LM head (a constant of every iteration) once per chunk, and a conditional copies it
    # into each branch's operands ([D, V] per chunk; both measured with psynth plan). The head is an
    # argument of the checkpointed chunks: closed over, it would be re-gathered inside each one.
    nll_sum, kl_sum = jnp.float32(0.0), jnp.float32(0.0)
    validf = valid.astype(jnp.float32)
    for j0 in range(0, width, chunk):
        part = slice(j0, j0 + chunk)
        terms = chunk_terms(head, hs[:, part], ht[:, part], ids[:, part], validf[:, part])
        nll_sum, kl_sum = nll_sum + terms[0], kl_sum + terms[1]
    n_tokens = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    nll = nll_sum / n_tokens
    metrics = {"ce": nll, "target_tokens": valid.sum().astype(jnp.float32)}
    loss = opts.ce_weight * nll
    if use_kl:
        kl = kl_sum / n_tokens * tmp**2
        metrics["kl"] = kl
        loss = loss + opts.kl_weight * kl
    metrics["loss"] = loss
    return loss, metrics


def split_trainable(model: Decoder, mapper: Mapper):
    """(graphdefs, trainable {lora, mapper}, frozen backbone state)."""
    gdef, lora_state, frozen = nnx.split(model, LoRAParam, ...)
    mdef, mstate = nnx.split(mapper)
    return (gdef, mdef), {"lora": lora_state, "mapper": mstate}, frozen


def merge_trainable(graphdefs, trainable, frozen) -> tuple[Decoder, Mapper]:
    gdef, mdef = graphdefs
    return nnx.merge(gdef, trainable["lora"], frozen), nnx.merge(mdef, trainable["mapper"])
