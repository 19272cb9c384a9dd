"""Splash attention (jax's TPU Pallas kernel, here in Pallas interpret mode on CPU) equals the dense
XLA reference for every cache layout the project uses, in the attention op, its gradients, and the
whole model (prefill, extend, decode, the synthesis cache path, the training objective).

Interpret mode is slow, so shapes are tiny; only valid query rows are compared where a layout has
rows that see no key at all (their splash output is finite but meaningless, see splash.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fast_compile import xla_flags
from psynth_jax.inference import runtime
from psynth_jax.model.kernels import splash
from psynth_jax.model.kernels.dispatch import IMPLEMENTATIONS, attend
from psynth_jax.model.kernels.xla import dense_attention
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import AttentionMask, write_rows
from psynth_jax.model.transformer import Decoder, LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.mapper import make_mapper

RNG = np.random.RandomState(0)


def _layout(starts, lens, t, s, hq, hkv, d, dtype):
    """Random q, a junk-filled cache with the chunk written at `start`, and the reference mask."""
    b = len(starts)
    q = jnp.asarray(RNG.randn(b, t, hq, d), dtype)
    k_new = jnp.asarray(RNG.randn(b, t, hkv, d), dtype)
    v_new = jnp.asarray(RNG.randn(b, t, hkv, d), dtype)
    start, n = jnp.asarray(starts, jnp.int32), jnp.asarray(lens, jnp.int32)
    k_cache = jnp.asarray(RNG.randn(b, s, hkv, d), dtype)  # junk beyond start + n must not leak
    v_cache = jnp.asarray(RNG.randn(b, s, hkv, d), dtype)
    k_cache, v_cache = write_rows(k_cache, k_new, start), write_rows(v_cache, v_new, start)
    valid = jnp.arange(s)[None, :] < (start + n)[:, None]
    mask = AttentionMask(q_slots=start[:, None] + jnp.arange(t)[None, :], kv_valid=valid)
    return q, k_cache, v_cache, k_new, v_new, start, n, mask


def _valid_rows(n, t):
    return np.asarray(jnp.arange(t)[None, :] < n[:, None])[..., None, None]


CASES = {  # name: (starts, chunk lens, T, S, Hq, Hkv, D)
    "prefill_empty_cache": ([0, 0], [7, 4], 7, 16, 4, 2, 16),
    "ps_prefix_causal_prompt": ([520, 433], [32, 21], 32, 560, 4, 2, 16),  # 2 kv blocks of 512
    "ragged_with_padding_rows": ([11, 0, 5, 0], [3, 5, 0, 0], 5, 24, 4, 2, 16),
    "decode_step": ([20, 9, 0], [1, 1, 0], 1, 32, 4, 2, 16),
    "mha": ([13, 5], [6, 6], 6, 32, 3, 3, 16),
    "gqa_4_to_1": ([9, 0], [4, 2], 4, 16, 4, 1, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_splash_equals_dense_reference_float32(name):
    starts, lens, t, s, hq, hkv, d = CASES[name]
    q, kc, vc, kn, vn, start, n, mask = _layout(starts, lens, t, s, hq, hkv, d, jnp.float32)
    ref = dense_attention(q, kc, vc, mask)
    got = jax.jit(lambda *a: attend(*a[:3], mask, impl="splash", chunk=a[3:]))(q, kc, vc, kn, vn, start, n)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert bool(jnp.isfinite(got).all())  # also rows that see no key
    diff = float(np.abs(np.where(_valid_rows(n, t), np.asarray(got) - np.asarray(ref), 0)).max())
    print(f"{name}: max|diff| {diff:.2e}")
    assert diff <= 1e-5


def test_splash_equals_dense_reference_bfloat16():
    starts, lens, t, s, hq, hkv, d = CASES["ps_prefix_causal_prompt"]
    q, kc, vc, kn, vn, start, n, mask = _layout(starts, lens, t, s, hq, hkv, d, jnp.bfloat16)
    ref = dense_attention(q, kc, vc, mask).astype(jnp.float32)
    got = jax.jit(splash.splash_attention)(q, kc, vc, kn, vn, start, n)
    assert got.dtype == jnp.bfloat16
    diff = float(np.abs(np.where(_valid_rows(n, t), np.asarray(got.astype(jnp.float32) - ref), 0)).max())
    print(f"bfloat16: max|diff| {diff:.2e}")
    assert diff <= 1e-2  # bf16 output rounding (|out| ~ 1) plus q scaled in bf16 before the kernel


def test_splash_several_query_and_key_blocks(monkeypatch):
    """Tiles capped at 128: 2 query blocks x 5 key blocks, so the online softmax crosses blocks and
    the causal chunk part has fully masked, partial and full blocks."""
    monkeypatch.setattr(splash, "MAX_BLOCK_Q", 128)
    monkeypatch.setattr(splash, "MAX_BLOCK_KV", 128)
    starts, lens, t, s, hq, hkv, d = [100, 0], [150, 90], 150, 300, 2, 1, 8
    plan = splash.SplashPlan.make(t, s)
    assert (plan.block_q, plan.t_pad, plan.block_kv, plan.kv_len) == (128, 256, 128, 640)
    q, kc, vc, kn, vn, start, n, mask = _layout(starts, lens, t, s, hq, hkv, d, jnp.float32)
    ref = dense_attention(q, kc, vc, mask)
    got = jax.jit(splash.splash_attention)(q, kc, vc, kn, vn, start, n)
    diff = float(np.abs(np.where(_valid_rows(n, t), np.asarray(got - ref), 0)).max())
    print(f"multi-block: max|diff| {diff:.2e}")
    assert diff <= 1e-5


def test_splash_gradients_equal_reference():
    """splash's own backward kernels (dq, dkv) give the reference's gradients w.r.t. q, the chunk's
    keys/values and the cache (what the training objective differentiates)."""
    starts, lens, t, s, hq, hkv, d = [13, 0], [6, 4], 6, 32, 4, 2, 16
    q, kc0, vc0, kn, vn, start, n, _ = _layout(starts, lens, t, s, hq, hkv, d, jnp.float32)
    w = jnp.asarray(RNG.randn(*q.shape), jnp.float32)
    rows = jnp.asarray(_valid_rows(n, t))
    valid = jnp.arange(s)[None, :] < (start + n)[:, None]
    mask = AttentionMask(q_slots=start[:, None] + jnp.arange(t)[None, :], kv_valid=valid)

    def loss(impl, q, kn, vn, kc, vc):
        kc, vc = write_rows(kc, kn, start), write_rows(vc, vn, start)
        out = attend(q, kc, vc, mask, impl=impl, chunk=(kn, vn, start, n))
        return jnp.sum(jnp.where(rows, out * w, 0.0))

    grads = {impl: jax.jit(jax.grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2, 3, 4)))(q, kn, vn, kc0, vc0)
             for impl in ("xla", "splash")}
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(grads["xla"], grads["splash"]))
    print(f"gradients: max|diff| {diff:.2e}")
    assert diff <= 1e-5


def test_splash_refuses_explicit_masks():
    assert "splash" in IMPLEMENTATIONS
    x = jnp.zeros((1, 2, 2, 8))
    chunk = (x, x, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))
    mask = AttentionMask(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), explicit=jnp.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="no explicit mask"):
        attend(x, x, x, mask, impl="splash", chunk=chunk)
    with pytest.raises(ValueError, match="no explicit mask"):  # nor a call without the chunk
        attend(x, x, x, dataclasses.replace(mask, explicit=None), impl="splash")


def test_interpret_mode_is_chosen_off_tpu():
    assert splash.default_interpret() == (jax.default_backend() != "tpu")


def _sharp_model(cfg: ModelConfig):
    """A random model whose q/k weights are scaled up, so attention is far from uniform and a wrong
    layout changes the logits."""
    model = Decoder(cfg, lora=LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    for proj in (model.layers.q, model.layers.k):
        proj.kernel[...] = proj.kernel[...] * 8.0
    return nnx.split(model)


CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def test_whole_model_splash_matches_xla():
    """prefill + extend + decode steps (one row idle in one step), then the synthesis cache path on
    that cache (branches -> re-encode + map + assemble -> synthesizer extend with LoRA): splash
    gives XLA's logits."""
    gd, st = _sharp_model(CFG)
    toks = jnp.asarray(RNG.randint(1, 97, size=(2, 12)))
    lens = jnp.asarray([12, 7])
    more = jnp.asarray(RNG.randint(1, 97, size=(2, 5)))
    mdef, mstate = nnx.split(make_mapper("affine_length", 2))
    out = {}
    for impl in ("xla", "splash"):
        logs = []
        lg, cache = runtime.prefill(gd, st, toks, lens, num_slots=24, attn_impl=impl)
        logs.append(lg)
        lg, cache = runtime.extend(gd, st, more, jnp.asarray([5, 3]), cache, attn_impl=impl)
        logs.append(lg)
        for i in range(3):
            lg, cache = runtime.decode_step(gd, st, jnp.argmax(lg, -1).astype(jnp.int32), cache,
                                            jnp.asarray([True, i != 1]), attn_impl=impl)
            logs.append(lg)
        # both rows as the branches of one request: their tokens after the prompt
        br = core.jit_hand_over(cache, lens, cache.end - lens, lens, num_requests=1, branch_slots=12)
        synth, _ = core.jit_prepare(br, mdef, mstate, cfg=CFG, extra_slots=8)
        lg, _ = runtime.extend(gd, st, toks[:1, :5], jnp.asarray([5]), synth, lora=True, attn_impl=impl)
        logs.append(lg)
        out[impl] = [np.asarray(x) for x in logs]
    diffs = [float(np.abs(a - b).max()) for a, b in zip(out["xla"], out["splash"])]
    print("whole model (prefill, extend, 3 decode steps, synthesizer extend): max|diff| "
          + ", ".join(f"{x:.2e}" for x in diffs) + f"; max|logit| {max(np.abs(x).max() for x in out['xla']):.2f}")
    assert max(diffs) <= 1e-5


def test_training_objective_gradients_match_xla():
    """The training objective (frozen branch prefill, synthesizer over [prompt | target] on the
    assembled cache; the KL teacher is a plain prefill, covered above) with remat, as the TPU
    configs run it: same loss and LoRA/mapper gradients."""
    optax = pytest.importorskip("optax")  # noqa: F841  (the train stack)
    from psynth_jax.train.objective import ObjectiveConfig, merge_trainable, split_trainable, synthesis_loss
    from train_fixtures import TINY, synthetic_batch

    model = Decoder(TINY, lora=LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    mapper = make_mapper("affine_length", 2)
    graphdefs, trainable, frozen = split_trainable(model, mapper)
    # non-zero LoRA B so the synthesizer's attention inputs depend on the adapter
    trainable = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), trainable)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(b=2, k=2, tb=12, ts=12, tt=24).items()}
    res = {}
    for impl in ("xla", "splash"):
        opts = ObjectiveConfig(remat=True, attn_impl=impl)

        def loss(t, opts=opts):
            model, mapper = merge_trainable(graphdefs, t, frozen)
            return synthesis_loss(model, mapper, batch, opts)[0]

        res[impl] = jax.jit(jax.value_and_grad(loss))(trainable)
    dl = abs(float(res["xla"][0]) - float(res["splash"][0]))
    dg = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(res["xla"][1]), jax.tree.leaves(res["splash"][1])))
    print(f"training objective: |loss diff| {dl:.2e}, max|grad diff| {dg:.2e}")
    assert dl <= 1e-5 and dg <= 1e-4


def test_shard_specs_follow_the_sharding_rules():
    """The axis names splash shards over are the sharding rules' (model/sharding.py); batch falls
    back to fewer axes when they do not divide it; kv heads that the tensor axis does not divide
    are refused by name."""
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from psynth_jax.model.sharding import DEFAULT_RULES, MESH_AXES

    rules = dict(DEFAULT_RULES)
    assert splash.BATCH_AXES == rules["batch"]
    assert (splash.HEAD_AXIS,) == rules["heads"] == rules["kv_heads"]
    mesh = AbstractMesh((2, 2, 2), MESH_AXES)
    assert splash.shard_specs(mesh, 8, 4, 2) == (P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp")))
    assert splash.shard_specs(mesh, 6, 4, 2)[1] == P(("data",))  # 6 rows: data only
    assert splash.shard_specs(mesh, 3, 4, 2)[1] == P(None)
    assert splash.shard_specs(AbstractMesh((4, 1), ("data", "tensor")), 4, 3, 1)[0] == P(("data",), None, None, None)
    with pytest.raises(ValueError, match=r"size 4\): kv heads \(2\) must be divisible.*query heads: 8"):
        splash.shard_specs(AbstractMesh((1, 2, 4), MESH_AXES), 4, 8, 2)


SHARDED_SPLASH_SCRIPT = r"""
import json, sys
import jax, numpy as np, optax
sys.path.insert(0, sys.argv[1])
from flax import nnx
from psynth_jax.model.transformer import Decoder, LoRAConfig
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, split_trainable
from psynth_jax.model.sharding import Rules, make_mesh
from psynth_jax.train.step import make_train_step, place_train_state
from train_fixtures import TINY, synthetic_batch

assert jax.device_count() == 8, jax.devices()
calls = []
_shard_map = jax.shard_map
def counting_shard_map(f, **kw):  # splash.py calls jax.shard_map: record each wrapped call's specs
    calls.append([str(s) for s in kw["in_specs"]])
    return _shard_map(f, **kw)
jax.shard_map = counting_shard_map

def run(impl):
    model = Decoder(TINY, lora=LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    graphdefs, trainable, frozen = split_trainable(model, make_mapper("affine_length", TINY.num_kv_heads, seed=0))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # non-zero LoRA B: attention depends on it
    tx = optax.sgd(1.0)  # updated params = params - gradients: compares the gradients themselves
    opt_state = tx.init(trainable)
    batch = synthetic_batch(b=4, k=2, tb=12, ts=12, tt=24)
    opts = ObjectiveConfig(kl_weight=0.5, remat=True, attn_impl=impl)
    mesh, rules = make_mesh((2, 2, 2)), Rules()
    trainable, opt_state, frozen = place_train_state(trainable, opt_state, frozen, mesh, rules)
    step = make_train_step(graphdefs, tx, opts, mesh, rules, trainable, opt_state, frozen, batch)
    new, _, m = step(trainable, opt_state, frozen, batch)
    return float(m["loss"]), [np.asarray(x) for x in jax.tree.leaves(new)]

xla_loss, xla_params = run("xla")
n_xla = len(calls)
splash_loss, splash_params = run("splash")
diff = max(float(np.abs(a - b).max()) for a, b in zip(xla_params, splash_params))
print(json.dumps({"xla": xla_loss, "splash": splash_loss, "param_diff": diff, "xla_shard_maps": n_xla,
                  "splash_shard_maps": calls[n_xla:]}))
"""


def test_sharded_train_step_splash_equals_xla():
    """8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2, remat on, KL teacher on: the sharded train
    step with splash (interpret mode, inside shard_map) gives XLA's loss and SGD update."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SPLASH_SCRIPT, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"sharded train step, splash vs xla: |loss diff| {abs(r['splash'] - r['xla']):.2e}, "
          f"max|param diff| {r['param_diff']:.2e}; shard_map calls {len(r['splash_shard_maps'])}")
    assert r["xla_shard_maps"] == 0
    # branch prefill, synthesizer, text teacher: each attention call wrapped, batch x heads sharded
    assert len(r["splash_shard_maps"]) == 3
    rows = "P(('data', 'fsdp'), None, 'tensor', None)"
    for specs in r["splash_shard_maps"]:
        assert specs == [rows] * 5 + ["P(('data', 'fsdp'),)"] * 2, specs
    assert abs(r["splash"] - r["xla"]) <= 1e-5
    assert r["param_diff"] <= 1e-4
