"""A memory plan before anyone spends accelerator time: per-device bytes of a train or eval config.

The train step's sibling (as MaxText's train_compile.py beside train.py): the same step
(train/step.py) compiled ahead of time for the target's mesh from a CPU host; `psynth plan`.

For a config and the slice it will run on (`--accelerator v5litepod-256`), every item is per
device, from the real code's shardings (model/sharding.py) and the real jitted step compiled for
a mesh of fake CPU devices shaped like the target's:

- parameters: the frozen backbone, each leaf's sharded share;
- LoRA + mapper and the optimizer state (training), replicated by the default rules;
- KV caches: training: the branch prefill cache and the synthesizer cache of one batch at the
  largest shapes the data guards admit; eval: the cache path's and the text path's caches at
  K branches x L tokens (informational: they live inside the compiled step's buffers);
- the compiled step's temporaries: `jit(...).lower(abstract inputs).compile().memory_analysis()`.

Data parallelism does not change what one device holds (each replica holds the same), so the
step is compiled on a mesh of data=1 x fsdp x tensor devices with the per-device batch kept.
The total (arguments + temporaries + non-aliased outputs) is compared with the chip's memory;
a plan that does not fit names the largest item.

The compile runs in a child process with as many fake CPU devices as the mesh needs (JAX fixes
the device count when it starts): `run_plan` spawns it and reads back its JSON. CPU compilers
fuse differently from TPU/GPU ones, so temporaries are an estimate of the same program; the
attention kernel is the `xla` one (blockwise where that path is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from psynth_jax.config import load_config, resolve_mesh_shape
from psynth_jax.config.accelerators import GIB, Accelerator
from psynth_jax.config.eval_schema import load_eval_config
from psynth_jax.config.loader import _load_yaml_tree
from psynth_jax.inference import runtime
from psynth_jax.interop.embedded import DEFAULT_MODEL
from psynth_jax.interop.sources import GGUFSource
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.model.loaded import abstract_decoder, parse_dtype
from psynth_jax.model.presets import _HF_CONFIGS, preset
from psynth_jax.model.sharding import CACHE_AXES, Rules, batch_sharding, make_mesh, sharded_bytes, state_shardings
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, split_trainable
from psynth_jax.train.step import batch_shardings, make_optimizer, make_train_step, train_shardings

# Fraction of a chip's memory a plan may use: the runtime, compiler scratch and fragmentation
# need the rest.
USABLE_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What to plan: a config file (+ overrides), its kind, the target, and eval shapes."""

    config: str
    overrides: tuple[str, ...]
    accelerator: Accelerator
    kind: str  # "train" | "eval"
    branches: int = 3  # eval: K
    branch_tokens: int = 4096  # eval: L per branch
    prompt_tokens: int = 256  # eval: synthesizer prompt tokens


def config_kind(path: str) -> str:
    """"eval" for a `psynth eval` config (it has `tasks`), else "train"."""
    tree = _load_yaml_tree(Path(path))
    return "eval" if isinstance(tree, dict) and "tasks" in tree else "train"


def model_config_for(source: str):
    """The ModelConfig of a model source without downloading weights: a local checkpoint's
    config.json / GGUF metadata, or the preset whose hub id it names (offline)."""
    if source == DEFAULT_MODEL:
        return preset("smollm2-135m")
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return ModelConfig.from_hf(GGUFSource(path).config_dict())
    if path.exists():
        return ModelConfig.from_hf(path)
    for name, (hub, _) in _HF_CONFIGS.items():
        if hub.lower() == source.lower() or name == source.lower():
            return preset(name)
    raise ValueError(f"model.source {source!r}: not a local checkpoint and no preset has that hub id; "
                     "plan from a local copy of its config.json (a directory path)")


# ------------------------------------------------------------------------------- the child
def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _leaf_bytes(tree: Any, shardings: Any) -> int:


    return sum(sharded_bytes(x.shape, x.dtype, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _kv_bytes(cfg, rows: int, slots: int, dtype_bytes: int, tensor: int) -> int:
    """Per-device bytes of K and V for `rows` (already per device) x `slots`, KV heads over tensor."""
    heads = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * rows * slots * heads * cfg.head_dim * dtype_bytes


def _stats(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
            "outputs": int(m.output_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}


def _smallest_bucket(need: int, buckets: tuple[int, ...]) -> int:
    fits = [b for b in buckets if b >= need]
    return min(fits) if fits else max(buckets)


def plan_train(cfg: Any, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Compile the trainer's step for `shape` = (data, fsdp, tensor) (data compiled as 1)."""
    data, fsdp, tensor = shape
    mcfg = model_config_for(cfg.model.source)
    rules = Rules((r.name, r.axes) for r in cfg.mesh.rules)
    mesh = make_mesh((1, fsdp, tensor), jax.devices()[: fsdp * tensor])
    lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    dtype = parse_dtype(cfg.model.dtype)
    gdef, abs_state = abstract_decoder(mcfg, dtype, lora, rules)
    mapper = nnx.eval_shape(lambda: make_mapper(cfg.mapper.kind, mcfg.num_kv_heads, cfg.mapper.hidden))
    graphdefs, trainable, frozen = split_trainable(nnx.merge(gdef, abs_state), mapper)
    t = cfg.train
    tx = make_optimizer(t.lr, t.steps, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, decay=t.decay,
                        clip_norm=t.clip_norm, grad_accum=t.grad_accum)
    opt_state = jax.eval_shape(tx.init, trainable)
    t_sh, o_sh, f_sh = train_shardings(trainable, opt_state, frozen, mesh, rules)
    d = cfg.data
    rows = max(d.batch_size // data, 1)  # the global batch of the compiled data=1 mesh
    k = d.num_branches
    tb = _smallest_bucket(d.max_cache_tokens, d.buckets)  # one branch may hold every cache token
    ts = _smallest_bucket(d.max_live_tokens, d.buckets)
    tt = _smallest_bucket(d.max_total_tokens, d.buckets)
    batch = {"branch_tokens": np.zeros((rows, k, tb), np.int32), "branch_prefix_len": np.zeros((rows, k), np.int32),
             "branch_len": np.zeros((rows, k), np.int32), "synth_tokens": np.zeros((rows, ts), np.int32),
             "synth_len": np.zeros((rows,), np.int32), "loss_mask": np.zeros((rows, ts), np.float32),
             "example_valid": np.zeros((rows,), bool)}
    if t.loss.kl_weight > 0:
        batch.update(text_tokens=np.zeros((rows, tt), np.int32), text_len=np.zeros((rows,), np.int32),
                     text_loss_mask=np.zeros((rows, tt), np.float32))
    opts = ObjectiveConfig(ce_weight=t.loss.ce_weight, kl_weight=t.loss.kl_weight, kl_temperature=t.loss.kl_temperature,
                           remat=t.remat, attn_impl="xla", handoff=Handoff.from_config(cfg.handoff))
    step = make_train_step(graphdefs, tx, opts, mesh, rules, trainable, opt_state, frozen, batch)
    b_sh = batch_shardings(batch, mesh, rules)
    compiled = step.lower(_abstract(trainable, t_sh), _abstract(opt_state, o_sh), _abstract(frozen, f_sh),
                          _abstract(batch, b_sh)).compile()
    per_rows = batch_sharding((rows,), mesh, rules).shard_shape((rows,))[0]
    item = np.dtype(dtype).itemsize
    return {
        "model": cfg.model.source, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "shapes": {"rows_per_device": per_rows, "branches": k, "branch_tokens": tb, "synth_tokens": ts,
                   "text_tokens": tt if t.loss.kl_weight > 0 else None},
        "items": {
            "parameters": _leaf_bytes(frozen, f_sh),
            "lora_mapper_optimizer": _leaf_bytes(trainable, t_sh) + _leaf_bytes(opt_state, o_sh),
            "kv_caches": _kv_bytes(mcfg, per_rows * k, tb, item, tensor) + _kv_bytes(mcfg, per_rows, k * tb + ts, item, tensor),
        },
        "compiled": _stats(compiled),
    }


def plan_eval(cfg: Any, shape: tuple[int, int, int], k: int, branch_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    """Compile the eval's largest calls on `shape`: text-path prefill of K*L + prompt tokens, and the
    cache path's prefill over K*L cached tokens; the larger sets the temporaries."""
    data, fsdp, tensor = shape
    mcfg = model_config_for(cfg.model.source)
    rules = Rules((r.name, r.axes) for r in cfg.mesh.rules)
    mesh = make_mesh((1, fsdp, tensor), jax.devices()[: fsdp * tensor])
    dtype = parse_dtype(cfg.model.dtype)
    gdef, state = abstract_decoder(mcfg, dtype, LoRAConfig(), rules)
    s_sh = state_shardings(state, mesh, rules)
    rows = max(cfg.batch_size // data, 1)
    new = cfg.max_new_tokens
    text_len = k * branch_tokens + prompt_tokens
    slots = text_len + new
    tok = jax.ShapeDtypeStruct((rows, text_len), jnp.int32, sharding=batch_sharding((rows, text_len), mesh, rules))
    lens = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch_sharding((rows,), mesh, rules))
    with jax.set_mesh(mesh):
        text = runtime.prefill.lower(gdef, _abstract(state, s_sh), tok, lens, num_slots=slots).compile()
        cache = jax.eval_shape(lambda: KVCache.zeros(mcfg, rows, slots, dtype))
        c_spec = rules.spec(CACHE_AXES, cache.k.shape, mesh)
        kv = jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype, sharding=NamedSharding(mesh, c_spec))
        per_row = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(x.shape, mesh, rules))  # noqa: E731
        abstract_cache = KVCache(k=kv, v=kv, valid=per_row(cache.valid), end=per_row(cache.end),
                                 next_pos=per_row(cache.next_pos))
        ptok = jax.ShapeDtypeStruct((rows, prompt_tokens), jnp.int32,
                                    sharding=batch_sharding((rows, prompt_tokens), mesh, rules))
        prompt = runtime.extend.lower(gdef, _abstract(state, s_sh), ptok, lens, abstract_cache, lora=True).compile()
    stats = {"text_prefill": _stats(text), "cache_prefill": _stats(prompt)}
    worst = max(stats, key=lambda n: stats[n]["arguments"] + stats[n]["temporaries"])
    per_rows = batch_sharding((rows,), mesh, rules).shard_shape((rows,))[0]
    return {
        "model": cfg.model.source, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "shapes": {"rows_per_device": per_rows, "branches": k, "branch_tokens": branch_tokens,
                   "prompt_tokens": prompt_tokens, "new_tokens": new},
        "items": {
            "parameters": _leaf_bytes(state, s_sh),
            "lora_mapper_optimizer": 0,
            "kv_caches": _kv_bytes(mcfg, per_rows, slots, np.dtype(dtype).itemsize, tensor),
        },
        "compiled": stats[worst], "compiled_call": worst, "compiled_all": stats,
    }


def child_main(request_json: str) -> None:
    """Entry of the compile child: plan the request, print one JSON line."""
    req = json.loads(request_json)
    if req["kind"] == "eval":
        cfg = load_eval_config(req["config"], req["overrides"])
    else:
        cfg = load_config(req["config"], req["overrides"])
    shape = resolve_mesh_shape(cfg.mesh, req["chips"])
    if req["kind"] == "eval":
        out = plan_eval(cfg, shape, req["branches"], req["branch_tokens"], req["prompt_tokens"])
    else:
        out = plan_train(cfg, shape)
    print("PLAN " + json.dumps(out))


# ------------------------------------------------------------------------------- the parent
def mesh_fits(req: PlanRequest) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of the config's mesh on the target; ValueError naming both otherwise.

    Training spans every chip of the slice; an eval runs its mesh on each host's own chips (the
    hosts split the examples), so an eval mesh is checked against one host's.
    """
    cfg = load_eval_config(req.config, req.overrides) if req.kind == "eval" else load_config(req.config, req.overrides)
    chips = req.accelerator.chips_per_host if req.kind == "eval" else req.accelerator.chips
    try:
        return resolve_mesh_shape(cfg.mesh, chips)
    except ValueError as err:
        where = f"one host ({chips} chips) of {req.accelerator}" if req.kind == "eval" else str(req.accelerator)
        raise ValueError(f"{req.config}: the mesh does not fit {where}: {err}") from None


def run_plan(req: PlanRequest, timeout_s: int = 3000) -> dict[str, Any]:
    """Spawn the compile child with the mesh's fake CPU devices; return its plan plus the verdict."""
    data, fsdp, tensor = mesh_fits(req)
    chips = req.accelerator.chips_per_host if req.kind == "eval" else req.accelerator.chips
    payload = dict(dataclasses.asdict(req), chips=chips, overrides=list(req.overrides))
    payload.pop("accelerator")
    # The CPU compiler has no bf16 arithmetic: it converts bf16 weights to f32 for every dot, and
    # its loop-invariant code motion would hoist those converts out of the layer loop, keeping an
    # f32 copy of every layer's weights alive at once (2x the parameters, an artifact no TPU / GPU
    # compile has). Without that pass only the running layer's copy exists: a conservative
    # overestimate by about one layer's weights in f32 per device.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(fsdp * tensor),
               XLA_FLAGS="--xla_disable_hlo_passes=while-loop-invariant-code-motion")
    proc = subprocess.run([sys.executable, "-m", "psynth_jax.train.plan", json.dumps(payload)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PLAN ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the memory plan's compile failed: {tail}")
    plan = json.loads(lines[-1][len("PLAN "):])
    return verdict(plan, req)


def verdict(plan: dict[str, Any], req: PlanRequest) -> dict[str, Any]:
    """Add the per-device total, the chip's usable memory, fits, and the largest item."""
    c = plan["compiled"]
    total = c["arguments"] + c["temporaries"] + max(c["outputs"] - c["aliased"], 0)
    usable = int(req.accelerator.chip.hbm_bytes * USABLE_FRACTION)
    parts = dict(plan["items"], compiled_temporaries=c["temporaries"])
    largest = max(parts, key=parts.get)
    return dict(plan, config=req.config, kind=req.kind, accelerator=str(req.accelerator),
                chip=req.accelerator.chip.name, chips=req.accelerator.chips, total=total,
                usable=usable, fits=total <= usable, largest_item=largest)


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a small table, GiB per device."""
    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    m, sh = p["mesh"], p["shapes"]
    lines = [f"memory plan: {p['config']} ({p['kind']}) on {p['accelerator']}",
             f"  mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}; shapes {sh}",
             "  per device                     GiB"]
    for name, b in p["items"].items():
        note = "  (inside the compiled buffers)" if name == "kv_caches" else ""
        lines.append(f"  {name:<28}{gib(b)}{note}")
    c = p["compiled"]
    lines.append(f"  {'compiled temporaries':<28}{gib(c['temporaries'])}"
                 + (f"  ({p['compiled_call']})" if "compiled_call" in p else ""))
    lines.append(f"  {'total (args + temps + out)':<28}{gib(p['total'])}   of {p['usable'] / GIB:.2f} usable "
                 f"({USABLE_FRACTION:.0%} of {p['chip']})")
    lines.append("  fits" if p["fits"] else f"  DOES NOT FIT: the largest item is {p['largest_item']}")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1])
