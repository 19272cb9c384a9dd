"""The compile side of `psynth plan` (train/plan.py), run in its child process: devices, mesh, programs, reports.

`compile_plan(request, config)` builds the target's mesh (the slice's TPU devices from libtpu,
or fake CPU devices for the estimate), the programs the config runs at their largest admitted
shapes (train/programs.py), compiles them one at a time and returns the plan: per-device items
from the shardings, and per program what the compiler said (train/aot.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from psynth_jax.config import resolve_mesh_shape
from psynth_jax.config.accelerators import Accelerator, parse_accelerator
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.interop.embedded import DEFAULT_MODEL
from psynth_jax.interop.sources import GGUFSource
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.loaded import abstract_decoder, parse_dtype
from psynth_jax.model.presets import _HF_CONFIGS, preset
from psynth_jax.model.sharding import Rules, batch_sharding, make_mesh, sharded_bytes, state_shardings
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.train import aot, programs
from psynth_jax.train.programs import GenerationShape, Lowering, TrainShape, TrainState


def model_config_for(source: str) -> ModelConfig:
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


def _leaf_bytes(tree: Any, shardings: Any) -> int:
    return sum(sharded_bytes(x.shape, x.dtype, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _kv_bytes(cfg: ModelConfig, rows: int, slots: int, dtype_bytes: int, tensor: int) -> int:
    """Per-device bytes of K and V for `rows` (already per device) x `slots`, KV heads over tensor."""
    heads = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * rows * slots * heads * cfg.head_dim * dtype_bytes


def _say(message: str) -> None:
    print(f"[psynth plan] {message}", file=sys.stderr, flush=True)


def compile_plan(req: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The plan of `cfg` for the request (see train/plan.py's PlanRequest, as JSON)."""
    acc = parse_accelerator(req["accelerator"])
    tpu, train = req["tpu"], req["kind"] == "train"
    chips = acc.chips if train else acc.chips_per_host
    data, fsdp, tensor = resolve_mesh_shape(cfg.mesh, chips)
    if tpu:  # the whole slice (training) or one host's chips as a slice of their own (eval)
        target = acc if train else Accelerator(acc.chip, chips)
        mesh = make_mesh((data, fsdp, tensor), aot.tpu_devices(target))
        replicas = 1
        topo = target.tpu_topology
        compiled_on = (f"{topo.name} (every chip of the slice, global batch)" if train
                       else f"{topo.name} (one host's {chips} chips: each host runs the eval mesh on its own)")
    else:
        mesh = make_mesh((1, fsdp, tensor), jax.devices()[: fsdp * tensor])
        replicas = data
        compiled_on = (f"{fsdp * tensor} fake CPU devices: one data-parallel replica (data=1 of {data}) "
                       "with its share of the batch")
    mcfg = model_config_for(cfg.model.source)
    rules = Rules((r.name, r.axes) for r in cfg.mesh.rules)
    dtype = parse_dtype(cfg.model.dtype)
    # the CPU estimate compiles the blockwise XLA attention: splash off TPU is the Pallas interpreter
    attn = cfg.model.attn_impl if tpu else "xla"
    item = np.dtype(dtype).itemsize
    per_device_rows = lambda rows: batch_sharding((rows,), mesh, rules).shard_shape((rows,))[0]  # noqa: E731
    todo: dict[str, tuple[str, Lowering]] = {}
    if train:
        state = TrainState.build(cfg, mcfg, dtype, mesh, rules)
        rows = max(cfg.data.batch_size // replicas, 1)
        shapes = programs.admitted_train_shapes(cfg.data, rows, kl=cfg.train.loss.kl_weight > 0)
        for shape in shapes:
            name = "train" if len(shapes) == 1 else f"train K={shape.branches} x {shape.branch_tokens}"
            todo[name] = (shape.label(), programs.train_step_program(cfg, state, shape, mesh, rules, attn))
        todo.update(_distill_programs(cfg, mcfg, dtype, mesh, rules, replicas, req["prompt_tokens"], attn))
        t_sh, o_sh, f_sh = state.shardings
        widest: TrainShape = max(shapes, key=lambda s: s.branches * s.branch_tokens)
        r = per_device_rows(rows)
        k, tb = widest.branches, widest.branch_tokens
        items = {"parameters": _leaf_bytes(state.frozen, f_sh),
                 "lora_mapper_optimizer": _leaf_bytes(state.trainable, t_sh) + _leaf_bytes(state.opt_state, o_sh),
                 "kv_caches": _kv_bytes(mcfg, r * k, tb, item, tensor)
                 + _kv_bytes(mcfg, r, k * tb + widest.synth_tokens, item, tensor)}
    else:
        rows = max(cfg.batch_size // replicas, 1)
        shape = GenerationShape(requests=rows, branches=req["branches"] or cfg.num_workers,
                                worker_prompt=req["prompt_tokens"], worker_tokens=req["branch_tokens"] or cfg.worker_tokens,
                                prompt_tokens=req["prompt_tokens"], new_tokens=cfg.max_new_tokens)
        lowerings = programs.generation_programs(
            mcfg, dtype, LoRAConfig(), ("affine_length", 32), mesh, rules, shape, attn_impl=attn,
            zero_copy=cfg.model.zero_copy, worker_sampling=SamplingConfig(cfg.worker_temperature, cfg.worker_top_p),
            sampling=SamplingConfig(cfg.synth_temperature))
        todo = {name: (shape.label(), lower) for name, lower in lowerings.items()}
        gdef, abs_state = abstract_decoder(mcfg, dtype, LoRAConfig(), rules)
        seq = shape.sequence_lengths()
        items = {"parameters": _leaf_bytes(abs_state, state_shardings(abs_state, mesh, rules)),
                 "lora_mapper_optimizer": 0,
                 "kv_caches": _kv_bytes(mcfg, per_device_rows(rows), seq["text_slots"], item, tensor)}
    wanted = req.get("programs")
    if wanted:
        unknown = sorted(set(wanted) - set(todo))
        if unknown:
            raise ValueError(f"--programs: {', '.join(unknown)} not among this config's programs: {', '.join(todo)}")
        todo = {n: v for n, v in todo.items() if n in wanted}
    reports = {}
    for name, (label, lower) in todo.items():
        _say(f"{name} [{label}]: tracing and lowering ...")
        started = time.perf_counter()
        lowered = lower()
        lower_s = time.perf_counter() - started
        _say(f"{name}: lowered in {lower_s:.0f} s; compiling with the {'TPU' if tpu else 'CPU'} compiler ...")
        executable = os.path.join(req["save_executable"], f"{name.replace(' ', '_')}.executable") \
            if tpu and req.get("save_executable") else None
        report = aot.compile_program(lowered, dump_dir=os.environ.get("PSYNTH_PLAN_DUMP") if tpu else None,
                                     executable_path=executable)
        if not tpu and report["fits"]:
            report["memory"].pop("peak", None)  # XLA:CPU's peak is not the device's live bytes
        report.update(shape=label, lower_s=round(lower_s, 1))
        reports[name] = report
        if report["fits"]:
            _say(f"{name}: compiled in {report['compile_s']:.0f} s, {report['memory']['total'] / 2**30:.2f} GiB per device")
        else:
            _say(f"{name}: does not fit ({report['oom']['message'][:200]})")
    topology = acc.tpu_topology
    return {"tpu": tpu, "compiler": aot.compiler_name(tpu), "compiled_on": compiled_on,
            "topology": topology.name if tpu and topology else None, "model": cfg.model.source, "attn_impl": attn,
            "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "items": items, "programs": reports,
            "device_kind": mesh.devices.flat[0].device_kind}


def _distill_programs(cfg: Any, mcfg: ModelConfig, dtype: Any, mesh: Any, rules: Rules, replicas: int,
                      prompt_tokens: int, attn: str) -> dict[str, tuple[str, Lowering]]:
    """Stage-2 distillation's generation, on the training mesh, when the stage writes its own targets:
    K sampled workers (the largest K any distillation source asks for) and the greedy text path."""
    from psynth_jax.data.distill import WORKER_TEMPERATURE, WORKER_TOP_P

    d = cfg.data
    sources = [s for s in d.train + d.eval if s.builder == "distillation"]
    if not sources:
        return {}
    k = max(max(s.k, default=d.num_branches) for s in sources)
    shape = GenerationShape(requests=max(d.distill_batch_size // replicas, 1), branches=k, worker_prompt=prompt_tokens,
                            worker_tokens=d.distill_worker_tokens, prompt_tokens=prompt_tokens,
                            new_tokens=d.distill_max_new_tokens)
    lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    lowerings = programs.generation_programs(
        mcfg, dtype, lora, (cfg.mapper.kind, cfg.mapper.hidden), mesh, rules, shape, attn_impl=attn, zero_copy=False,
        worker_sampling=SamplingConfig(WORKER_TEMPERATURE, WORKER_TOP_P), sampling=SamplingConfig(),
        only=programs.DISTILL_PROGRAMS)
    return {f"distill_{name}": (shape.label(), lower) for name, lower in lowerings.items()}
