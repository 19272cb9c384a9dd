"""The train step: only mapper + LoRA learn; a sharded step equals the single-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fast_compile import xla_flags
from psynth_jax.model.loaded import random_model
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, split_trainable, synthesis_loss, merge_trainable
from psynth_jax.model.sharding import Rules, make_mesh
from psynth_jax.train.step import make_optimizer, make_schedule, make_train_step
from train_fixtures import TINY, synthetic_batch


def _setup(kl=0.0, mapper_kind="affine_length"):
    lm = random_model(TINY, lora=LoRAConfig(rank=4, alpha=8.0), seed=0)
    decoder = nnx.merge(lm.graphdef, lm.state)
    mapper = make_mapper(mapper_kind, TINY.num_kv_heads, seed=0)
    graphdefs, trainable, frozen = split_trainable(decoder, mapper)
    return graphdefs, trainable, frozen, ObjectiveConfig(kl_weight=kl)


def test_gradients_reach_only_mapper_and_lora():
    graphdefs, trainable, frozen, opts = _setup(kl=0.3)
    batch = jax.tree.map(jnp.asarray, synthetic_batch())

    def loss(trainable):
        model, mapper = merge_trainable(graphdefs, trainable, frozen)
        return synthesis_loss(model, mapper, batch, opts)[0]

    g_train = jax.grad(loss)(trainable)  # the step differentiates the trainable tree only
    leaves = jax.tree_util.tree_leaves_with_path(g_train)
    assert leaves, "no trainable parameters"
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert all("lora" in n or "mapper" in n for n in names), names
    # every LoRA B and the mapper's last layer receive signal (the parts that start at zero)
    for p, g in leaves:
        key = jax.tree_util.keystr(p)
        if "lora_b" in key or "w1" in key:
            assert float(jnp.abs(g).max()) > 0, key
    # trainable params count: LoRA on q,k,v,o for 2 layers + the 260-parameter mapper
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    lora_per_layer = 4 * (32 + 32) + 4 * (32 + 16) * 2 + 4 * (32 + 32)
    assert n_train == 2 * lora_per_layer + 260

    tx = make_optimizer(1e-2, 10)
    opt_state = tx.init(trainable)
    step = make_train_step(graphdefs, tx, opts, make_mesh((1, 1, 1)), Rules(), trainable, opt_state, frozen,
                           synthetic_batch())
    before = jax.tree.map(np.asarray, frozen)
    new_trainable, _, metrics = step(trainable, opt_state, frozen, synthetic_batch())
    after = jax.tree.map(np.asarray, frozen)
    jax.tree.map(np.testing.assert_array_equal, before, after)  # backbone untouched
    assert np.isfinite(float(metrics["loss"]))
    assert n_train == sum(x.size for x in jax.tree.leaves(new_trainable))


def test_optimizer_state_holds_only_trainable_parameters():
    graphdefs, trainable, frozen, opts = _setup()
    opt_state = make_optimizer(1e-4, 10).init(trainable)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
    assert n_opt <= 2 * n_train + 8  # Adam mu + nu (+ counters), nothing of the backbone


def test_schedules():
    s = make_schedule(1.0, 100, 10, "cosine")
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and float(s(100)) < 1e-3
    assert float(make_schedule(1e-4, 100, 0, "none")(57)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="unknown decay"):
        make_schedule(1.0, 10, 0, "step")


def test_loss_decreases_on_a_fixed_batch():
    graphdefs, trainable, frozen, opts = _setup(mapper_kind="per_head_affine")
    tx = make_optimizer(3e-2, 20)
    opt_state = tx.init(trainable)
    batch = synthetic_batch(seed=3)
    step = make_train_step(graphdefs, tx, opts, make_mesh((1, 1, 1)), Rules(), trainable, opt_state, frozen, batch)
    losses = []
    for _ in range(8):
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from flax import nnx
from psynth_jax.model.loaded import random_model
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, split_trainable
from psynth_jax.model.sharding import Rules, make_mesh, state_shardings
from psynth_jax.train.step import make_optimizer, make_train_step, place_train_state
from train_fixtures import TINY, synthetic_batch

assert jax.device_count() == 8, jax.devices()
def placed_step(shape, devices, objective):
    # the tiny model's train state placed on the mesh, its jitted step and a batch
    lm = random_model(TINY, lora=LoRAConfig(rank=4, alpha=8.0), seed=0)
    graphdefs, trainable, frozen = split_trainable(nnx.merge(lm.graphdef, lm.state),
                                                   make_mapper("affine_length", TINY.num_kv_heads, seed=0))
    tx = make_optimizer(1e-2, 10)
    opt_state = tx.init(trainable)
    batch = synthetic_batch(b=4)
    mesh, rules = make_mesh(shape, devices), Rules()
    trainable, opt_state, frozen = place_train_state(trainable, opt_state, frozen, mesh, rules)
    step = make_train_step(graphdefs, tx, objective, mesh, rules, trainable, opt_state, frozen, batch)
    return step, trainable, opt_state, frozen, batch
def run(shape, devices):
    step, trainable, opt_state, frozen, batch = placed_step(shape, devices, ObjectiveConfig(kl_weight=0.5))
    losses = []
    for _ in range(2):
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch)
        losses.append(float(m["loss"]))
    q_spec = str(frozen["layers"]["q"]["kernel"][...].sharding.spec)
    return losses, [np.asarray(x) for x in jax.tree.leaves(trainable)], q_spec
def gathered_shapes():
    # the result shapes of every all-gather in the sharded step, the loss cut into 4 LM-head chunks
    import re
    step, trainable, opt_state, frozen, batch = placed_step((2, 2, 2), jax.devices(),
                                                            ObjectiveConfig(kl_weight=0.5, logit_chunk=4))
    hlo = step.lower(trainable, opt_state, frozen, batch).compile().as_text()
    return [[int(d) for d in m.group(1).split(",")] for m in re.finditer(r"= \w+\[([\d,]+)\][^=]*? all-gather\(", hlo)]
single_losses, single_params, _ = run((1, 1, 1), jax.devices()[:1])
sharded_losses, sharded_params, q_spec = run((2, 2, 2), jax.devices())
diff = max(float(np.abs(a - b).max()) for a, b in zip(single_params, sharded_params))
print(json.dumps({"single": single_losses, "sharded": sharded_losses, "param_diff": diff, "q_spec": q_spec,
                  "gathered": gathered_shapes()}))
"""


def test_sharded_step_equals_single_device_step(tmp_path):
    """8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2, vs 1 device: same loss and update."""
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, tests_dir], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print("single vs sharded:", r)
    np.testing.assert_allclose(r["sharded"], r["single"], atol=1e-5, rtol=0)
    assert r["param_diff"] <= 1e-5
    assert "fsdp" in r["q_spec"] and "tensor" in r["q_spec"]  # the backbone really is sharded
    # What psynth plan caught at 14B: the LM head gathered once (not once per loss chunk: 4 here),
    # and no device ever holds every row's branch cache [L, B*K, S, H, D] (B*K = 12).
    head = [TINY.hidden_size, TINY.vocab_size]
    assert 1 <= sum(shape == head for shape in r["gathered"]) <= 2, r["gathered"]
    assert not [s for s in r["gathered"] if len(s) == 5 and s[:2] == [TINY.num_layers, 12]], r["gathered"]


def test_the_cpu_kernels_give_xlas_loss_and_gradients():
    """attn_impl "cpu" in training: every forward reads the weights through the matmul kernels
    (kernels/cpu.py, their backward XLA's): the objective's loss and LoRA + mapper gradients are
    XLA's."""
    import dataclasses

    graphdefs, trainable, frozen, opts = _setup(kl=0.3)
    batch = jax.tree.map(jnp.asarray, synthetic_batch())

    def loss(trainable, impl):
        model, mapper = merge_trainable(graphdefs, trainable, frozen)
        return synthesis_loss(model, mapper, batch, dataclasses.replace(opts, attn_impl=impl))[0]

    got = {impl: jax.jit(jax.value_and_grad(loss), static_argnums=1)(trainable, impl) for impl in ("xla", "cpu")}
    np.testing.assert_allclose(float(got["cpu"][0]), float(got["xla"][0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got["cpu"][1]), jax.tree.leaves(got["xla"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
