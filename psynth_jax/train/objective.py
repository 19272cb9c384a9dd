"""The training objective over the parallel-cache layout (METHOD.md section 5).

For a batch of B examples x K branches:
1. the frozen backbone (LoRA off) prefills every branch's [worker prefix | output] text; only
   the output KV is kept (no gradient flows into it);
2. re-encoding, the cache mapper and assembly build the synthesizer cache (gradient -> mapper);
3. the synthesizer (LoRA on) runs teacher-forced over [prompt | target] on top of it
   (gradient -> LoRA); cross-entropy on target tokens only, prompt tokens masked.
Optionally a token-level KL to the text-concatenation teacher (same backbone, LoRA off, every
branch as text) on the same target tokens, computed on the fly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.inference.runtime import lengths_mask
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.model.transformer import Decoder, LoRAParam
from psynth_jax.synthesis.handoff import BranchCaches, assemble, extract_branches, reencode
from psynth_jax.synthesis.mapper import Mapper, map_caches


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    ce_weight: float = 1.0
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    remat: bool = False
    attn_impl: str = "xla"


def branch_caches(model: Decoder, batch: dict[str, jax.Array], attn_impl: str = "xla") -> BranchCaches:
    """Prefill each branch's [prefix | output] with the frozen backbone; keep the output KV."""
    b, k, tb = batch["branch_tokens"].shape
    rows = batch["branch_tokens"].reshape(b * k, tb)
    starts = batch["branch_prefix_len"].reshape(-1)
    lengths = batch["branch_len"].reshape(-1)
    cache = KVCache.zeros(model.cfg, b * k, tb, model.dtype)
    _, cache = model(rows, cache, lengths_mask(starts + lengths, tb), lora=False, attn_impl=attn_impl, output="hidden")
    cache = jax.lax.stop_gradient(cache)
    return extract_branches(cache, starts, lengths, num_requests=b, branch_slots=tb)


def synth_cache(mapper: Mapper, branches: BranchCaches, cfg, extra_slots: int) -> KVCache:
    """Re-encode + map + assemble (differentiable in the mapper parameters)."""
    branches = reencode(branches, cfg)
    k, v = map_caches(mapper, branches.k, branches.v, branches.lengths)
    return assemble(dataclasses.replace(branches, k=k, v=v), extra_slots)


def _target_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[t + 1] | ... t) for every t (last position gets a dummy target)."""
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _aligned_teacher_logits(teacher: jax.Array, text_mask: jax.Array, student_mask: jax.Array) -> jax.Array:
    """Teacher logits [B, Tt, V] moved onto the student's target positions -> [B, Ts, V].

    Both masks mark the same target tokens (same count, contiguous), only at different offsets.
    """
    ts = student_mask.shape[1]
    s0 = jnp.argmax(student_mask > 0, axis=1)
    t0 = jnp.argmax(text_mask > 0, axis=1)
    idx = jnp.clip(jnp.arange(ts)[None, :] - s0[:, None] + t0[:, None], 0, teacher.shape[1] - 1)
    return jnp.take_along_axis(teacher, idx[..., None], axis=1)


def synthesis_loss(
    model: Decoder, mapper: Mapper, batch: dict[str, jax.Array], opts: ObjectiveConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted CE (+ KL) over target tokens; returns (loss, metrics)."""
    branches = branch_caches(model, batch, opts.attn_impl)
    tokens = batch["synth_tokens"]
    ts = tokens.shape[1]
    cache = synth_cache(mapper, branches, model.cfg, ts)
    h, _ = model(tokens, cache, lengths_mask(batch["synth_len"], ts), lora=True, attn_impl=opts.attn_impl,
                 output="hidden", remat=opts.remat)
    logits = model.logits(h)
    mask = batch["loss_mask"] * batch["example_valid"][:, None].astype(jnp.float32)
    n_tokens = jnp.maximum(mask.sum(), 1.0)
    nll = -(_target_logprobs(logits, tokens) * mask).sum() / n_tokens
    metrics = {"ce": nll, "target_tokens": mask.sum()}
    loss = opts.ce_weight * nll
    if opts.kl_weight > 0:
        text = batch["text_tokens"]
        th, _ = model(text, KVCache.zeros(model.cfg, text.shape[0], text.shape[1], model.dtype),
                      lengths_mask(batch["text_len"], text.shape[1]), lora=False, attn_impl=opts.attn_impl,
                      output="hidden", remat=opts.remat)
        teacher = jax.lax.stop_gradient(model.logits(th))
        teacher = _aligned_teacher_logits(teacher, batch["text_loss_mask"], mask)
        tmp = opts.kl_temperature
        p_t = jax.nn.log_softmax(teacher / tmp, axis=-1)
        p_s = jax.nn.log_softmax(logits / tmp, axis=-1)
        kl_tok = (jnp.exp(p_t) * (p_t - p_s)).sum(-1)
        kl = (kl_tok * mask).sum() / n_tokens * tmp**2
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
