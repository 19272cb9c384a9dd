"""The programs a config runs, lowered for a mesh from abstract arguments: what `psynth plan` compiles.

Nothing here allocates a weight: parameters, optimizer state, batches and caches are
`jax.ShapeDtypeStruct`s carrying the shardings the real run gives them (model/sharding.py,
train/step.py), and every program is the package's own jitted function, lowered with them:

- training: the trainer's step (`train/step.py: make_train_step`) at each batch shape of
  `admitted_train_shapes`: the largest ones the data guards let through;
- generation (`generation_programs`): what `ParallelSynthesis` runs for an evaluation and what
  stage-2 distillation runs to write its targets: the workers' generate (prefill + token loop),
  the handoff (extract, prepare: re-encode + map + assemble), the cache path's prefill and decode,
  and the text path's prefill and decode.

Programs are traced with the mesh as the abstract context mesh (`jax.sharding.use_abstract_mesh`),
which is what splash attention shards over and decides Mosaic or interpret mode by
(`sharding.target_platform`); `jax.set_mesh` would need the devices to exist (splash builds its
mask tables eagerly on the context mesh's devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psynth_jax.config.schema import DataConfig
from psynth_jax.inference import runtime
from psynth_jax.inference.generator import bucket
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import BranchCaches, BranchView, KVCache
from psynth_jax.model.loaded import abstract_decoder
from psynth_jax.model.sharding import BRANCH_AXES, CACHE_AXES, Rules, batch_sharding, state_shardings
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, split_trainable
from psynth_jax.train.step import batch_shardings, make_optimizer, make_train_step, train_shardings

Lowering = Callable[[], Any]  # () -> jax.stages.Lowered; lowered only when compiled, one at a time


def abstract(tree: Any, shardings: Any) -> Any:
    """Shape-only arrays of `tree` carrying `shardings` (jit's `lower` takes them as arguments)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ------------------------------------------------------------------------------------ training
@dataclasses.dataclass(frozen=True)
class TrainShape:
    """One static batch shape of the train step: rows x K branches x Tb, synthesizer Ts, text Tt."""

    rows: int
    branches: int
    branch_tokens: int
    synth_tokens: int
    text_tokens: int | None  # only with a KL term

    def label(self) -> str:
        text = f", text {self.text_tokens:,}" if self.text_tokens else ""
        return f"{self.rows} rows x K={self.branches} x {self.branch_tokens:,} + {self.synth_tokens:,}{text}"


def _smallest_bucket(need: int, buckets: tuple[int, ...]) -> int:
    return min((b for b in buckets if b >= need), default=max(buckets))


def admitted_train_shapes(d: DataConfig, rows: int, kl: bool) -> list[TrainShape]:
    """The largest batch shapes the data guards admit: each is one the step must fit, no admitted
    shape is larger in both K and Tb than all of them.

    K ranges over [min_branches, max_branches] and the branch bucket Tb over `buckets` (every
    branch is padded to the bucket of the widest [worker prompt | output], and no guard bounds a
    worker prompt: any bucket is reachable); `max_branch_slots` bounds K x Tb. For each Tb the
    largest admitted K; of those, the pairs no other pair dominates (memory grows with both).
    Without `max_branch_slots` that is one shape: max_branches x the largest bucket. Ts is the
    bucket of max_live_tokens; Tt (KL term only) the largest bucket.
    """
    points = []
    for tb in sorted(d.buckets):
        k = d.max_branches if d.max_branch_slots is None else min(d.max_branches, d.max_branch_slots // tb)
        if k >= d.min_branches:
            points.append((k, tb))
    frontier = [(k, tb) for k, tb in points if not any(k2 >= k and tb2 > tb for k2, tb2 in points)]
    ts = _smallest_bucket(d.max_live_tokens, d.buckets)
    return [TrainShape(rows, k, tb, ts, max(d.buckets) if kl else None) for k, tb in frontier]


def train_batch(shape: TrainShape) -> dict[str, np.ndarray]:
    """A zero batch of `shape` with the trainer's keys and dtypes (data/pipeline.py)."""
    rows, k, tb, ts = shape.rows, shape.branches, shape.branch_tokens, shape.synth_tokens
    batch = {"branch_tokens": np.zeros((rows, k, tb), np.int32), "branch_prefix_len": np.zeros((rows, k), np.int32),
             "branch_len": np.zeros((rows, k), np.int32), "synth_tokens": np.zeros((rows, ts), np.int32),
             "synth_len": np.zeros((rows,), np.int32), "loss_mask": np.zeros((rows, ts), np.float32),
             "example_valid": np.zeros((rows,), bool)}
    if shape.text_tokens:
        tt = shape.text_tokens
        batch.update(text_tokens=np.zeros((rows, tt), np.int32), text_len=np.zeros((rows,), np.int32),
                     text_loss_mask=np.zeros((rows, tt), np.float32))
    return batch


@dataclasses.dataclass
class TrainState:
    """The abstract train state of a config on a mesh: what every train-step program takes."""

    graphdefs: Any
    tx: Any
    trainable: Any
    opt_state: Any
    frozen: Any
    shardings: tuple[Any, Any, Any]

    @classmethod
    def build(cls, cfg: Any, mcfg: ModelConfig, dtype: Any, mesh: Mesh, rules: Rules) -> "TrainState":
        lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
        gdef, state = abstract_decoder(mcfg, dtype, lora, rules)
        mapper = nnx.eval_shape(lambda: make_mapper(cfg.mapper.kind, mcfg.num_kv_heads, cfg.mapper.hidden))
        graphdefs, trainable, frozen = split_trainable(nnx.merge(gdef, state), mapper)
        t = cfg.train
        tx = make_optimizer(t.lr, t.steps, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, decay=t.decay,
                            clip_norm=t.clip_norm, grad_accum=t.grad_accum)
        opt_state = jax.eval_shape(tx.init, trainable)
        return cls(graphdefs, tx, trainable, opt_state, frozen, train_shardings(trainable, opt_state, frozen, mesh, rules))


def train_step_program(cfg: Any, state: TrainState, shape: TrainShape, mesh: Mesh, rules: Rules,
                       attn_impl: str) -> Lowering:
    """The trainer's step at `shape` (its remat, loss, handoff and attention as the config sets them)."""
    t = cfg.train
    opts = ObjectiveConfig(ce_weight=t.loss.ce_weight, kl_weight=t.loss.kl_weight, kl_temperature=t.loss.kl_temperature,
                           remat=t.remat, attn_impl=attn_impl, handoff=Handoff.from_config(cfg.handoff),
                           zero_copy=cfg.model.zero_copy)
    batch = train_batch(shape)

    def lower() -> Any:
        step = make_train_step(state.graphdefs, state.tx, opts, mesh, rules, state.trainable, state.opt_state,
                               state.frozen, batch)
        t_sh, o_sh, f_sh = state.shardings
        return step.lower(abstract(state.trainable, t_sh), abstract(state.opt_state, o_sh),
                          abstract(state.frozen, f_sh), abstract(batch, batch_shardings(batch, mesh, rules)))

    return lower


# ---------------------------------------------------------------------------------- generation
@dataclasses.dataclass(frozen=True)
class GenerationShape:
    """B requests x K branches: worker prompt and output tokens, synthesizer prompt, answer tokens."""

    requests: int
    branches: int
    worker_prompt: int
    worker_tokens: int
    prompt_tokens: int
    new_tokens: int

    def label(self) -> str:
        return (f"B={self.requests}, K={self.branches} x {self.worker_tokens:,} (worker prompt {self.worker_prompt}), "
                f"prompt {self.prompt_tokens}, {self.new_tokens:,} new")

    def sequence_lengths(self) -> dict[str, int]:
        """The padded lengths the programs see, bucketed as the Generator and ParallelSynthesis pad."""
        wp = bucket(self.worker_prompt)
        sp = bucket(self.prompt_tokens)
        tp = bucket(self.branches * self.worker_tokens + self.prompt_tokens)
        return {"worker_prompt": wp, "worker_slots": bucket(wp + self.worker_tokens),
                "branch_slots": bucket(self.worker_tokens), "prompt": sp, "synth_extra": bucket(sp + self.new_tokens),
                "text_prompt": tp, "text_slots": bucket(tp + self.new_tokens)}


PROGRAMS = ("worker_generate", "handoff", "prepare", "cache_prefill", "cache_decode", "text_prefill", "text_decode")
DISTILL_PROGRAMS = ("worker_generate", "text_prefill", "text_decode")  # what stage-2 distillation runs


def generation_programs(mcfg: ModelConfig, dtype: Any, lora: LoRAConfig | None, mapper: tuple[str, int], mesh: Mesh,
                        rules: Rules, shape: GenerationShape, *, attn_impl: str, zero_copy: bool,
                        worker_sampling: SamplingConfig, sampling: SamplingConfig,
                        only: tuple[str, ...] = PROGRAMS) -> dict[str, Lowering]:
    """{name: lowering} of the generation programs in `only` (PROGRAMS), as `ParallelSynthesis` calls
    them: workers (LoRA off), handoff (extract, or with `zero_copy` the view: nothing to compile),
    prepare, the cache path's prefill and decode (LoRA on when the model has one), the text path's."""
    gdef, state = abstract_decoder(mcfg, dtype, lora, rules)
    a_state = abstract(state, state_shardings(state, mesh, rules))
    mdef, mstate = nnx.split(nnx.eval_shape(lambda: make_mapper(mapper[0], mcfg.num_kv_heads, mapper[1])))
    a_mstate = abstract(mstate, state_shardings(mstate, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())

    def per_row(shape_: tuple[int, ...], dt: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape_, dt, sharding=batch_sharding(shape_, mesh, rules))

    def cache(rows: int, slots: int) -> KVCache:
        kv_shape = (mcfg.num_layers, rows, slots, mcfg.num_kv_heads, mcfg.head_dim)
        kv = jax.ShapeDtypeStruct(kv_shape, dtype, sharding=NamedSharding(mesh, rules.spec(CACHE_AXES, kv_shape, mesh)))
        return KVCache(k=kv, v=kv, valid=per_row((rows, slots), bool), end=per_row((rows,), jnp.int32),
                       next_pos=per_row((rows,), jnp.int32))

    seq = shape.sequence_lengths()
    b, k = shape.requests, shape.branches
    key = jax.eval_shape(lambda: jax.random.key(0))
    a_key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    logits = per_row((b, mcfg.vocab_size), jnp.float32)
    stops = tuple(mcfg.eos_token_ids) or (0,)
    worker_cache = cache(b * k, seq["worker_slots"])
    rows_int = per_row((b * k,), jnp.int32)
    per_branch = per_row((b, k), jnp.int32)
    lb = seq["branch_slots"]
    if zero_copy:
        scalars = jax.ShapeDtypeStruct((mcfg.num_layers, b, k, mcfg.num_kv_heads), jnp.float32,
                                       sharding=NamedSharding(mesh, rules.spec(("layers", "batch", None, "kv_heads"),
                                                                               (mcfg.num_layers, b, k, mcfg.num_kv_heads),
                                                                               mesh)))
        branches: Any = BranchView(k=worker_cache.k, v=worker_cache.v, starts=per_branch, lengths=per_branch,
                                   offsets=per_branch, k_scale=scalars, k_shift=scalars, v_scale=scalars,
                                   v_shift=scalars)
        synth_cache, view = cache(b, seq["synth_extra"]), branches
    else:
        bshape = (mcfg.num_layers, b, k, lb, mcfg.num_kv_heads, mcfg.head_dim)
        bkv = jax.ShapeDtypeStruct(bshape, dtype, sharding=NamedSharding(mesh, rules.spec(BRANCH_AXES, bshape, mesh)))
        branches = BranchCaches(k=bkv, v=bkv, lengths=per_branch, offsets=per_branch)
        synth_cache, view = cache(b, k * lb + seq["synth_extra"]), None
    synth_lora = lora is not None

    def traced(fn: Callable[[], Any]) -> Lowering:
        def lower() -> Any:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn()
        return lower

    programs: dict[str, Lowering] = {
        "worker_generate": traced(lambda: runtime.generate.lower(
            gdef, a_state, per_row((b * k, seq["worker_prompt"]), jnp.int32), rows_int, a_key,
            max_new_tokens=shape.worker_tokens, sampling=worker_sampling, stop_ids=stops,
            num_slots=seq["worker_slots"], lora=False, attn_impl=attn_impl)),
        "cache_prefill": traced(lambda: runtime.extend.lower(
            gdef, a_state, per_row((b, seq["prompt"]), jnp.int32), per_row((b,), jnp.int32), synth_cache,
            lora=synth_lora, attn_impl=attn_impl, view=view)),
        "cache_decode": traced(lambda: runtime.continue_generation.lower(
            gdef, a_state, logits, synth_cache, a_key, max_new_tokens=shape.new_tokens, sampling=sampling,
            stop_ids=stops, lora=synth_lora, attn_impl=attn_impl, view=view)),
        "text_prefill": traced(lambda: runtime.prefill.lower(
            gdef, a_state, per_row((b, seq["text_prompt"]), jnp.int32), per_row((b,), jnp.int32),
            num_slots=seq["text_slots"], lora=False, attn_impl=attn_impl)),
        "text_decode": traced(lambda: runtime.continue_generation.lower(
            gdef, a_state, logits, cache(b, seq["text_slots"]), a_key, max_new_tokens=shape.new_tokens,
            sampling=sampling, stop_ids=stops, lora=False, attn_impl=attn_impl)),
    }
    if not zero_copy:  # a view is handed over and prepared outside any large jit (core.jit_hand_over)
        programs["handoff"] = traced(lambda: core.jit_extract.lower(
            worker_cache, rows_int, rows_int, rows_int, num_requests=b, branch_slots=lb, rules=rules))
        programs["prepare"] = traced(lambda: core.jit_materialise.lower(
            branches, mdef, a_mstate, cfg=mcfg, extra_slots=seq["synth_extra"]))
    return {name: programs[name] for name in only if name in programs}
