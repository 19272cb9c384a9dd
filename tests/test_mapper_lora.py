"""Cache mapper algebra and identity init; LoRA as a no-op at B = 0 and as W + (alpha/r) A B."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.model.loaded import random_model
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import LoRAConfig, LoRAParam
from psynth_jax.synthesis.mapper import MapperParam, make_mapper, map_caches, mapper_features

CFG = ModelConfig(
    family="llama", vocab_size=89, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=256,
)
RNG = np.random.RandomState(0)


def branch_kv(layers=3, b=2, k=3, length=5, heads=2, dim=8):
    shape = (layers, b, k, length, heads, dim)
    return jnp.asarray(RNG.randn(*shape), jnp.float32), jnp.asarray(RNG.randn(*shape), jnp.float32)


@pytest.mark.parametrize("kind", ["affine_length", "per_head_affine"])
def test_mapper_is_identity_at_init(kind):
    k, v = branch_kv()
    lengths = jnp.asarray([[5, 2, 4], [1, 3, 5]])
    k2, v2 = map_caches(make_mapper(kind, 2), k, v, lengths)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))


def test_release_mapper_shape_and_parameter_count():
    m = make_mapper("affine_length", 2)
    params = nnx.state(m, MapperParam)
    assert sum(x.size for x in jax.tree.leaves(params)) == 260  # 3*32+32 + 32*4+4


def test_mapper_features_match_the_release_formula():
    f = mapper_features(jnp.asarray([[0, 7]]), 3, 4)  # [layers=4, B=1, K=2, 3]
    assert f.shape == (4, 1, 2, 3)
    np.testing.assert_allclose(f[0, 0, 0], [np.log1p(1), np.log1p(3), 0.0], rtol=1e-6)  # max(L, 1)
    np.testing.assert_allclose(f[2, 0, 1], [np.log1p(7), np.log1p(3), 2 / 3], rtol=1e-6)
    single_layer = mapper_features(jnp.asarray([[4]]), 1, 1)
    assert float(single_layer[0, 0, 0, 2]) == 0.0


def test_affine_length_mapper_algebra():
    """K' = (1 + 0.1 tanh r0) K + 0.1 tanh r1, V' = (1 + 0.1 tanh r2) V + 0.1 tanh r3, per (layer, branch)."""
    m = make_mapper("affine_length", 2, seed=3)
    m.net.w1[...] = jnp.asarray(RNG.randn(32, 4), jnp.float32)
    m.net.b1[...] = jnp.asarray(RNG.randn(4), jnp.float32)
    k, v = branch_kv()
    lengths = jnp.asarray([[5, 2, 4], [1, 3, 5]])
    k2, v2 = map_caches(m, k, v, lengths)
    feats = np.asarray(mapper_features(lengths, 3, 3))
    w0, b0, w1, b1 = (np.asarray(x[...]) for x in (m.net.w0, m.net.b0, m.net.w1, m.net.b1))
    h = feats @ w0 + b0
    r = (h / (1 + np.exp(-h))) @ w1 + b1  # SiLU MLP in numpy
    for layer in range(3):
        for b in range(2):
            for i in range(3):
                ak, bk, av, bv = 1 + 0.1 * np.tanh(r[layer, b, i, 0]), 0.1 * np.tanh(r[layer, b, i, 1]), \
                    1 + 0.1 * np.tanh(r[layer, b, i, 2]), 0.1 * np.tanh(r[layer, b, i, 3])
                np.testing.assert_allclose(k2[layer, b, i], ak * np.asarray(k[layer, b, i]) + bk, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(v2[layer, b, i], av * np.asarray(v[layer, b, i]) + bv, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(k2), np.asarray(k))


def test_per_head_mapper_scales_heads_independently():
    m = make_mapper("per_head_affine", 2, seed=0)
    m.net.b1[...] = jnp.asarray([0.0, 5.0, 0, 0, 0, 0, 0, 0], jnp.float32)  # alpha_k of head 1 only
    k, v = branch_kv()
    k2, v2 = map_caches(m, k, v, jnp.full((2, 3), 5))
    np.testing.assert_array_equal(np.asarray(k2[..., 0, :]), np.asarray(k[..., 0, :]))
    np.testing.assert_allclose(np.asarray(k2[..., 1, :]), (1 + 0.1 * np.tanh(5.0)) * np.asarray(k[..., 1, :]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))


def test_unknown_mapper_kind():
    with pytest.raises(ValueError, match="unknown mapper kind 'content'"):
        make_mapper("content", 2)


def _logits(m, tokens, lora):
    logits, _ = runtime.prefill(m.graphdef, m.state, tokens, jnp.asarray([tokens.shape[1]] * tokens.shape[0]),
                                num_slots=tokens.shape[1], output="all", lora=lora)
    return np.asarray(logits)


def test_lora_with_zero_b_changes_nothing():
    m = random_model(CFG, lora=LoRAConfig(rank=4, alpha=8.0), seed=0)
    tokens = jnp.asarray(RNG.randint(0, CFG.vocab_size, size=(2, 9)))
    np.testing.assert_array_equal(_logits(m, tokens, True), _logits(m, tokens, False))


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ("q", "v", "gate", "down")])
def test_lora_equals_dense_merged_weights(targets):
    lora = LoRAConfig(rank=4, alpha=8.0, targets=targets)
    m = random_model(CFG, lora=lora, seed=0)
    model = nnx.merge(m.graphdef, m.state)
    for name in targets:
        lin = getattr(model.layers, name)
        lin.lora_b[...] = jnp.asarray(RNG.randn(*lin.lora_b.shape) * 0.1, jnp.float32)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(RNG.randint(0, CFG.vocab_size, size=(2, 9)))
    with_lora = _logits(type(m)(CFG, graphdef, state, "float32", "random", lora), tokens, True)

    plain = random_model(CFG, seed=0)
    base = nnx.merge(plain.graphdef, plain.state)
    nnx.update(base, nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))  # same backbone
    for name in targets:
        lin, src = getattr(base.layers, name), getattr(model.layers, name)
        delta = jnp.einsum("lir,lro->lio", src.lora_a[...], src.lora_b[...]) * lora.scale
        lin.kernel[...] = src.kernel[...] + delta
    g2, s2 = nnx.split(base)
    merged = _logits(type(m)(CFG, g2, s2, "float32", "random", None), tokens, False)
    assert np.abs(with_lora - merged).max() <= 1e-4
    assert np.abs(with_lora - _logits(type(m)(CFG, graphdef, state, "float32", "random", lora), tokens, False)).max() > 1e-3


def test_bad_lora_config():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRAConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRAConfig(rank=0)
