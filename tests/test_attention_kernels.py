"""The fused-kernel layout (prefix unmasked + causal chunk, merged by log-sum-exp) equals the
dense XLA reference, for every cache layout the project uses. Runs the split through XLA's
kernel on CPU; on GPU the same code runs cuDNN."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from psynth_jax.inference import runtime
from psynth_jax.model.loaded import random_model
from psynth_jax.model.kernels.cudnn_split import split_attention
from psynth_jax.model.kernels.dispatch import attend
from psynth_jax.model.kernels.xla import dense_attention, xla_attention
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import AttentionMask, write_layers, write_rows
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.mapper import make_mapper
from flax import nnx

RNG = np.random.RandomState(0)


def _chunk_layout(starts, lens, t, explicit=False):
    """Random q and chunk K/V [2, t, ...], a junk-filled cache of 32 slots before the chunk is
    written (junk beyond `start` must not leak), and the post-write mask (random explicit
    visibility when asked)."""
    b, s, hq, hkv, d = 2, 32, 6, 2, 16
    q = jnp.asarray(RNG.randn(b, t, hq, d), jnp.float32)
    k_new = jnp.asarray(RNG.randn(b, t, hkv, d), jnp.float32)
    v_new = jnp.asarray(RNG.randn(b, t, hkv, d), jnp.float32)
    start, n = jnp.asarray(starts, jnp.int32), jnp.asarray(lens, jnp.int32)
    k_old = jnp.asarray(RNG.randn(b, s, hkv, d), jnp.float32)
    v_old = jnp.asarray(RNG.randn(b, s, hkv, d), jnp.float32)
    valid = jnp.arange(s)[None, :] < (start + n)[:, None]
    vis = jnp.asarray(RNG.rand(b, t, s) < 0.6) if explicit else None
    mask = AttentionMask(q_slots=start[:, None] + jnp.arange(t)[None, :], kv_valid=valid, explicit=vis)
    return q, k_new, v_new, start, n, k_old, v_old, mask


@pytest.mark.parametrize("starts,lens,t", [
    ([0, 0], [7, 4], 7),  # plain prefill of ragged prompts
    ([13, 5], [6, 6], 6),  # synthesizer prompt after packed branch caches of different sizes
    ([20, 9], [1, 1], 1),  # decode step
    ([11, 0], [3, 5], 5),  # one row with, one without a prefix
])
def test_split_equals_dense_reference(starts, lens, t):
    q, k_new, v_new, start, n, k_old, v_old, mask = _chunk_layout(starts, lens, t)
    k_cache, v_cache = write_rows(k_old, k_new, start), write_rows(v_old, v_new, start)
    ref = dense_attention(q, k_cache, v_cache, mask)
    got = split_attention(q, k_cache, v_cache, k_new, v_new, start, n, kernel="xla")
    rows = (jnp.arange(t)[None, :] < n[:, None])[..., None, None]  # compare valid queries only
    assert float(jnp.abs(jnp.where(rows, got - ref, 0)).max()) <= 1e-5


@pytest.mark.parametrize("starts,lens,t,explicit", [
    ([20, 9], [1, 1], 1, False),  # decode step over a long and a short cache
    ([20, 9], [1, 0], 1, False),  # a finished row (its token is padding)
    ([0, 31], [1, 1], 1, False),  # first token of an empty cache; the last free slot
    ([12, 3], [1, 1], 1, True),  # an explicit mask keeps its meaning over [old cache | own key]
    ([13, 5], [6, 4], 6, False),  # a prefill chunk (written first, then the dense reference)
    ([4, 0], [5, 5], 5, True),
])
def test_xla_path_equals_dense_over_written_cache(starts, lens, t, explicit):
    """attend() reads the cache as it was before the chunk; it must equal dense attention over
    the cache with the chunk written in (what the model computed before), junk slots included."""
    q, k_new, v_new, start, n, k_old, v_old, mask = _chunk_layout(starts, lens, t, explicit)
    ref = dense_attention(q, write_rows(k_old, k_new, start), write_rows(v_old, v_new, start), mask)
    got = jax.jit(xla_attention)(q, k_old, v_old, mask, (k_new, v_new, start, n))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)
    via_attend = attend(q, k_old, v_old, mask, impl="xla", chunk=(k_new, v_new, start, n))
    np.testing.assert_allclose(np.asarray(via_attend), np.asarray(ref), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("starts,t", [([3, 0, 9], 1), ([0, 5, 2], 4), ([30, 1, 29], 4)])  # last: clamped
def test_write_layers_places_like_write_rows_per_layer(starts, t):
    buf = jnp.asarray(RNG.randn(3, 3, 32, 2, 4), jnp.float32)  # [L, B, S, H, D]
    new = jnp.asarray(RNG.randn(3, 3, t, 2, 4), jnp.float32)
    start = jnp.asarray(starts, jnp.int32)
    want = jnp.stack([write_rows(buf[i], new[i], start) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(jax.jit(write_layers)(buf, new, start)), np.asarray(want))


@pytest.mark.parametrize("starts,lens,t", [([13, 5], [6, 6], 6), ([11, 0], [3, 5], 5)])
def test_split_layout_gradients_equal_the_xla_paths(starts, lens, t):
    """The split layout's merge weights come from a log-sum-exp jax returns without a gradient; its
    backward is the XLA path's, so query, cache and chunk gradients are the reference's (they were
    off by half the reference's scale before)."""
    q, k_new, v_new, start, n, k_old, v_old, mask = _chunk_layout(starts, lens, t)
    out_w = jnp.asarray(RNG.randn(*q.shape), jnp.float32)
    rows = (jnp.arange(t)[None, :] < n[:, None])[..., None, None]  # padding query rows carry no loss

    def loss(impl):
        def f(q, k_old, v_old, k_new, v_new):
            out = attend(q, k_old, v_old, mask, impl=impl, chunk=(k_new, v_new, start, n))
            return jnp.sum(jnp.where(rows, out, 0.0) * out_w)
        return jax.grad(f, argnums=(0, 1, 2, 3, 4))(q, k_old, v_old, k_new, v_new)

    for name, a, b in zip(("q", "k cache", "v cache", "k chunk", "v chunk"), loss("xla_split"), loss("xla")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=0, err_msg=name)


def test_fused_layout_refuses_explicit_masks():
    x = jnp.zeros((1, 2, 2, 8))
    mask = AttentionMask(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), explicit=jnp.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="no explicit mask"):
        attend(x, x, x, mask, impl="cudnn", chunk=(x, x, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32)))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attend(x, x, x, mask, impl="flash")


def test_whole_model_split_layout_matches_reference():
    """Generation and the cache path give the same logits with the split layout as with XLA."""
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    m = random_model(cfg, lora=LoRAConfig(rank=2), seed=0)
    toks = jnp.asarray(RNG.randint(1, 97, size=(2, 12)))
    lens = jnp.asarray([12, 7])
    outs = {}
    for impl in ("xla", "xla_split"):
        g = runtime.generate(m.graphdef, m.state, toks, lens, jax.random.key(0), max_new_tokens=6,
                             num_slots=24, attn_impl=impl)
        br = core.jit_hand_over(g.cache, lens, g.num_tokens, lens, num_requests=1, branch_slots=8)
        mdef, mstate = nnx.split(make_mapper("affine_length", 2))
        cache, _ = core.jit_prepare(br, mdef, mstate, cfg=cfg, extra_slots=8)
        logits, _ = runtime.extend(m.graphdef, m.state, toks[:1, :5], jnp.asarray([5]), cache, lora=True,
                                   attn_impl=impl)
        outs[impl] = (np.asarray(g.tokens), np.asarray(logits))
    np.testing.assert_array_equal(outs["xla"][0], outs["xla_split"][0])
    assert np.abs(outs["xla"][1] - outs["xla_split"][1]).max() <= 1e-4
