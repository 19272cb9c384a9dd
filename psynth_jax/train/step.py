"""Optimizer and the jitted, sharded train step (only mapper + LoRA are differentiated)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from psynth_jax import distributed
from psynth_jax.model.sharding import Rules, batch_sharding, state_shardings
from psynth_jax.train.objective import ObjectiveConfig, merge_trainable, synthesis_loss


def make_schedule(lr: float, steps: int, warmup_steps: int, decay: str) -> optax.Schedule:
    """Linear warmup to `lr`, then constant ("none", the release), cosine or linear decay to 0."""
    if decay == "none":
        main = optax.constant_schedule(lr)
    elif decay == "cosine":
        main = optax.cosine_decay_schedule(lr, max(steps - warmup_steps, 1))
    elif decay == "linear":
        main = optax.linear_schedule(lr, 0.0, max(steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown decay {decay!r}; choose none, cosine or linear")
    if warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def make_optimizer(
    lr: float, steps: int, *, weight_decay: float = 0.0, warmup_steps: int = 0, decay: str = "none",
    clip_norm: float | None = None, grad_accum: int = 1,
) -> optax.GradientTransformation:
    """AdamW (release defaults: lr 1e-4, no decay, no clipping) with the optional extras."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(make_schedule(lr, steps, warmup_steps, decay), weight_decay=weight_decay))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def train_shardings(trainable: Any, opt_state: Any, frozen: Any, mesh: Mesh, rules: Rules) -> tuple[Any, Any, Any]:
    """Shardings of (trainable, optimizer state, frozen backbone) on `mesh`: the NNX states by
    their logical axes and the rules (the backbone sharded, LoRA and mapper replicated by the
    default rules), the optimizer state replicated (it mirrors the small trainable tree)."""
    rep = NamedSharding(mesh, P())
    return (state_shardings(trainable, mesh, rules), jax.tree.map(lambda _: rep, opt_state),
            state_shardings(frozen, mesh, rules))


def place_train_state(trainable: Any, opt_state: Any, frozen: Any, mesh: Mesh, rules: Rules) -> tuple[Any, Any, Any]:
    """(trainable, opt_state, frozen) placed by `train_shardings` (a no-op for arrays already there;
    on a pod, values each process holds on its own devices go through the host: `distributed.put`)."""
    return distributed.put((trainable, opt_state, frozen), train_shardings(trainable, opt_state, frozen, mesh, rules))


def batch_shardings(batch: dict[str, Any], mesh: Mesh, rules: Rules) -> dict[str, NamedSharding]:
    """Every batch array split over the batch rule's mesh axes on its leading (example) dimension."""
    return {k: batch_sharding(np.shape(v), mesh, rules) for k, v in batch.items()}


def make_train_step(
    graphdefs: tuple, tx: optax.GradientTransformation, opts: ObjectiveConfig, mesh: Mesh, rules: Rules,
    trainable: Any, opt_state: Any, frozen: Any, example_batch: dict[str, Any],
) -> Callable:
    """jit(step) with explicit in/out shardings over `mesh`; trainable + optimizer state donated.

    step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)

    trainable / opt_state / frozen must be placed as `train_shardings` says (`place_train_state`;
    the loader creates the backbone that way already); the batch is split over the batch rule. The step
    is traced with `mesh` as the context mesh (`use_abstract_mesh`), so the model's sharding
    constraints apply and code that must know the mesh finds it with
    `jax.sharding.get_abstract_mesh()` (attn_impl="splash" wraps its Pallas kernel in a shard_map
    over it, model/kernels/splash.py). Done inside the traced function, so it holds however the jitted
    step is called or lowered.
    """

    def step(trainable, opt_state, frozen, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _step(trainable, opt_state, frozen, batch)

    def _step(trainable, opt_state, frozen, batch):
        def loss_fn(t):
            model, mapper = merge_trainable(graphdefs, t, frozen)
            return synthesis_loss(model, mapper, batch, opts)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return trainable, opt_state, metrics

    rep = NamedSharding(mesh, P())
    t_sh, o_sh, f_sh = train_shardings(trainable, opt_state, frozen, mesh, rules)
    return jax.jit(
        step,
        in_shardings=(t_sh, o_sh, f_sh, batch_shardings(example_batch, mesh, rules)),
        out_shardings=(t_sh, o_sh, rep),
        donate_argnums=(0, 1),
    )


def make_eval_step(graphdefs: tuple, opts: ObjectiveConfig, mesh: Mesh | None = None) -> Callable:
    """jit(eval_loss)(trainable, frozen, batch) -> metrics (no gradient).

    mesh: traced with it as the context mesh, as the train step is (sharding constraints, splash).
    """

    def eval_step(trainable, frozen, batch):
        model, mapper = merge_trainable(graphdefs, trainable, frozen)
        if mesh is None:
            return synthesis_loss(model, mapper, batch, opts)[1]
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return synthesis_loss(model, mapper, batch, opts)[1]

    return jax.jit(eval_step)
