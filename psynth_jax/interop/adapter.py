"""Import trained synthesizer weights: PEFT LoRA adapters, cache mappers, `psynth train` runs.

Reads what export.py writes and what the reference release ships: a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) and its mapper, either our mapper.safetensors
(+ mapper_config.json) or the release's cache_mapper.pt. The .pt file (a `torch.save` zip of a
pickle plus raw storages) is read WITHOUT torch by a restricted unpickler that rebuilds plain
tensors only, so inference boxes without torch can import the release.

Everything is checked against the model before use; a mismatch raises `AdapterError` naming the
file, the tensor and both shapes (or both configs).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from psynth_jax.interop.export import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, FAMILY_METADATA, MAPPER_CONFIG, MAPPER_KEYS, MAPPER_WEIGHTS, peft_key,
    peft_target,
)
from psynth_jax.model.loaded import LoadedModel, parse_dtype
from psynth_jax.model.sharding import state_shardings
from psynth_jax.model.transformer import LORA_TARGETS, Decoder, LoRAConfig, LoRAParam
from psynth_jax.synthesis.mapper import Mapper, make_mapper

if TYPE_CHECKING:
    from psynth_jax.config import ExperimentConfig
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

RELEASE_MAPPER = "cache_mapper.pt"


class AdapterError(ValueError):
    """An adapter, mapper or run directory does not fit the model (or is malformed)."""


def describe_lora(lora: LoRAConfig) -> str:
    """A LoRA in one line, e.g. "LoRA r16/a32 on q,k,v,o"."""
    return f"LoRA r{lora.rank}/a{lora.alpha:g} on {','.join(lora.targets)}"


# ------------------------------------------------------------------------------------ LoRA
def with_lora(model: LoadedModel, lora: LoRAConfig, weights: dict[str, Any]) -> LoadedModel:
    """`model`'s backbone with a LoRA of config `lora` holding `weights`.

    `weights` is the pure dict of the LoRA state, {"layers": {target: {"lora_a": [L, in, r],
    "lora_b": [L, r, out]}}}. The model's own LoRA (any rank/targets, or none) is replaced; the
    backbone arrays are shared, not copied. On a mesh the LoRA is placed by the model's sharding
    rules (replicated by default), beside the backbone.
    """
    dtype = parse_dtype(model.dtype_name)
    rules = model.rules
    abstract = nnx.eval_shape(lambda: Decoder(model.cfg, lora=lora, dtype=dtype, rules=rules, rngs=nnx.Rngs(0)))
    graphdef, lora_state, _ = nnx.split(abstract, LoRAParam, ...)
    _, _, frozen = nnx.split(nnx.merge(model.graphdef, model.state), LoRAParam, ...)
    want = nnx.to_pure_dict(lora_state)["layers"]
    got = weights.get("layers", {})
    if set(got) != set(want):
        raise AdapterError(f"LoRA weights cover {sorted(got)}, the LoRA config targets {sorted(want)}")
    for t, leaves in want.items():
        for leaf, spec in leaves.items():
            shape = tuple(np.shape(got[t][leaf]))
            if shape != tuple(spec.shape):
                raise AdapterError(f"LoRA {t}.{leaf} has shape {shape}, the model expects {tuple(spec.shape)}")
    nnx.replace_by_pure_dict(lora_state, {"layers": {
        t: {leaf: np.asarray(got[t][leaf], np.float32) for leaf in leaves} for t, leaves in want.items()}})
    if model.mesh is not None:
        lora_state = jax.device_put(lora_state, state_shardings(lora_state, model.mesh, rules))
    else:
        lora_state = jax.tree.map(jnp.asarray, lora_state)
    graphdef, state = nnx.split(nnx.merge(graphdef, lora_state, frozen))
    return dataclasses.replace(model, graphdef=graphdef, state=state, lora=lora)


def read_peft_config(adapter_dir: str | Path) -> LoRAConfig:
    """rank / alpha / targets of a PEFT LoRA adapter directory; rejects options we do not implement."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {d}")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {d}: not a PEFT adapter directory")
    c = json.loads(path.read_text())
    if c.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {c['peft_type']!r} is not supported (only LORA)")
    plain = {"bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}
    odd = {k: c[k] for k, ok in plain.items() if c.get(k, ok) != ok}
    odd.update({k: c[k] for k in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                                  "layer_replication", "target_parameters", "trainable_token_indices", "lora_bias")
                if c.get(k)})
    if odd:
        raise AdapterError(f"{path}: unsupported LoRA options {odd} (supported: plain LoRA, {plain})")
    modules = c.get("target_modules")
    by_name = {peft_target(t): t for t in LORA_TARGETS}
    if modules == "all-linear":
        modules = list(by_name)
    if not isinstance(modules, list):
        raise AdapterError(f"{path}: target_modules {modules!r} is not supported; use a list of {list(by_name)}")
    unknown = [m for m in modules if m.rsplit(".", 1)[-1] not in by_name]
    if unknown:
        raise AdapterError(f"{path}: target_modules {unknown} are not supported; choose from {list(by_name)}")
    names = {m.rsplit(".", 1)[-1] for m in modules}
    targets = tuple(t for t in LORA_TARGETS if peft_target(t) in names)
    return LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), targets=targets)


def _check_expected(lora: LoRAConfig, expect: LoRAConfig | None, where: Path) -> None:
    if expect is None:
        return
    if (lora.rank, lora.alpha, set(lora.targets)) != (expect.rank, expect.alpha, set(expect.targets)):
        raise AdapterError(f"adapter {where} has {describe_lora(lora)}; expected {describe_lora(expect)}")


def load_peft_adapter(model: LoadedModel, adapter_dir: str | Path, *,
                      expect: LoRAConfig | None = None) -> LoadedModel:
    """`model` with the LoRA of a PEFT adapter directory (rank, alpha, targets from its config).

    `expect`, when given, is the LoRA the caller requires (an error names both otherwise).
    """
    d = Path(adapter_dir)
    lora = read_peft_config(d)
    _check_expected(lora, expect, d)
    path = d / ADAPTER_WEIGHTS
    if not path.is_file():
        hint = " (adapter_model.bin is not read: re-save the adapter with safe_serialization=True)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {d}{hint}")
    cfg = model.cfg
    with safe_open(str(path), framework="numpy") as f:
        family = (f.metadata() or {}).get(FAMILY_METADATA)
        if family is not None and family != cfg.family:
            raise AdapterError(f"adapter {d} was exported from a {family} model; this model is {cfg.family}")
        names = set(f.keys())
        layer_ids = {int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))}
        if layer_ids and max(layer_ids) + 1 != cfg.num_layers:
            raise AdapterError(f"adapter {d} holds LoRA weights for {max(layer_ids) + 1} layers; "
                               f"the model ({model.source}) has {cfg.num_layers}")
        expected = {peft_key(i, t, w) for i in range(cfg.num_layers) for t in lora.targets for w in "AB"}
        if names - expected:
            raise AdapterError(f"adapter {path} has unexpected tensors for {describe_lora(lora)}: "
                               f"{sorted(names - expected)[:5]}")
        if expected - names:
            raise AdapterError(f"adapter {path} lacks tensors {sorted(expected - names)[:5]}")
        dims = _lora_dims(model, lora)
        layers = {}
        for t in lora.targets:
            d_in, d_out = dims[t]
            a = [_get(f, peft_key(i, t, "A"), (lora.rank, d_in), path) for i in range(cfg.num_layers)]
            b = [_get(f, peft_key(i, t, "B"), (d_out, lora.rank), path) for i in range(cfg.num_layers)]
            layers[t] = {"lora_a": np.stack([x.T for x in a]), "lora_b": np.stack([x.T for x in b])}
    return with_lora(model, lora, {"layers": layers})


def _lora_dims(model: LoadedModel, lora: LoRAConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every LoRA target's projection, from the model's kernels."""
    layers = nnx.to_pure_dict(model.state)["layers"]
    return {t: tuple(np.shape(layers[t]["kernel"])[1:]) for t in lora.targets}


def _get(f: Any, name: str, want: tuple[int, ...], path: Path) -> np.ndarray:
    w = f.get_tensor(name)
    if tuple(w.shape) != want:
        raise AdapterError(f"{path}: tensor {name!r} has shape {tuple(w.shape)}, the model expects {want}")
    return w.astype(np.float32)


# ---------------------------------------------------------------------------------- mapper
def mapper_file(directory: str | Path) -> Path | None:
    """The mapper inside an adapter directory: our mapper.safetensors, else the release's cache_mapper.pt."""
    found = [Path(directory) / n for n in (MAPPER_WEIGHTS, RELEASE_MAPPER) if (Path(directory) / n).is_file()]
    return found[0] if found else None


def load_mapper(path: str | Path, num_kv_heads: int) -> Mapper:
    """A mapper from mapper.safetensors (ours), cache_mapper.pt (the release) or a directory with one.

    The kind comes from mapper_config.json next to the file when present, else from the output
    width: 4 is the release's affine_length mapper, 4 x num_kv_heads a per-head mapper.
    """
    p = Path(path)
    if p.is_dir():
        found = mapper_file(p)
        if found is None:
            raise FileNotFoundError(f"no {MAPPER_WEIGHTS} or {RELEASE_MAPPER} in {p}")
        p = found
    if not p.is_file():
        raise FileNotFoundError(f"mapper file not found: {p}")
    if p.suffix == ".safetensors":
        tensors = load_file(str(p))
    else:
        tensors = read_torch_state_dict(p)
    config_path = p.parent / MAPPER_CONFIG
    config = json.loads(config_path.read_text()) if p.suffix == ".safetensors" and config_path.is_file() else {}
    return _mapper_from_tensors(tensors, num_kv_heads, config, p)


def _mapper_from_tensors(tensors: dict[str, np.ndarray], num_kv_heads: int, config: dict[str, Any],
                         where: Path) -> Mapper:
    names = {name for name, _ in MAPPER_KEYS.values()}
    if set(tensors) != names:
        raise AdapterError(f"mapper {where}: expected tensors {sorted(names)}, found {sorted(tensors)}")
    hidden, n_out = tensors["net.0.weight"].shape[0], tensors["net.2.weight"].shape[0]
    kind = config.get("kind") or ("affine_length" if n_out == 4 else "per_head_affine")
    heads = config.get("num_kv_heads")
    if kind == "per_head_affine" and heads is not None and heads != num_kv_heads:
        raise AdapterError(f"mapper {where} is a per-head mapper for {heads} KV heads; the model has {num_kv_heads}")
    if kind == "per_head_affine" and n_out != 4 * num_kv_heads:
        raise AdapterError(f"mapper {where} outputs {n_out} values: neither the release's 4 nor "
                           f"4 x {num_kv_heads} KV heads of a per-head mapper for this model")
    mapper = make_mapper(kind, num_kv_heads, hidden)
    state = nnx.state(mapper)
    net = nnx.to_pure_dict(state)["net"]
    new = {}
    for leaf, (name, transpose) in MAPPER_KEYS.items():
        want = tuple(reversed(net[leaf].shape)) if transpose else tuple(net[leaf].shape)
        w = tensors[name]
        if tuple(w.shape) != want:
            raise AdapterError(f"mapper {where}: tensor {name!r} has shape {tuple(w.shape)}, expected {want}")
        w = np.asarray(w, np.float32)
        new[leaf] = jnp.asarray(w.T if transpose else w)
    nnx.replace_by_pure_dict(state, {"net": new})
    nnx.update(mapper, state)
    return mapper


# ------------------------------------------------------------------ torch.save without torch
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> np.ndarray:
    item = storage.dtype.itemsize
    return np.array(np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                                    strides=[s * item for s in stride]))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into numpy arrays; refuses every other global."""

    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(f"{root}data.pkl"))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name}: only state dicts of plain tensors can be read without torch")

    def persistent_load(self, pid: Any) -> np.ndarray:
        _, dtype, key, _, numel = pid  # ("storage", dtype, key, location, numel)
        raw = self.archive.read(f"{self.root}data/{key}")
        return np.frombuffer(raw, dtype, count=numel)


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of a `torch.save(state_dict)` file (zip format, torch >= 1.6), without torch.

    Storages are read as little-endian (what every x86/ARM machine writes; others are refused).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"{path} is not a torch.save zip archive (the legacy pre-1.6 format is not "
                           "supported: re-save it with a recent torch)")
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkl:
            raise AdapterError(f"{path}: no data.pkl inside; not a torch.save file")
        root = pkl[0][: -len("data.pkl")]
        order = f"{root}byteorder"
        if order in z.namelist() and z.read(order).decode().strip() != "little":
            raise AdapterError(f"{path} was saved on a big-endian machine; only little-endian files are read")
        try:
            obj = _StateDictUnpickler(z, root).load()
        except pickle.UnpicklingError as e:
            raise AdapterError(f"{path}: {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise AdapterError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


# ------------------------------------------------------------------------- training runs
@dataclasses.dataclass
class TrainedRun:
    """The newest restorable checkpoint of a `psynth train` run, applied to a backbone."""

    model: LoadedModel  # with the run's LoRA filled in
    mapper: Mapper
    step: int
    config: ExperimentConfig  # the run's config.yaml


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The ExperimentConfig saved in a run directory (its config.yaml)."""
    from psynth_jax.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config.yaml in {run_dir}: not a `psynth train` run directory")
    return load_config(path)


def _shape_mismatches(checkpointer: Any, skeleton: Any) -> list[str]:
    """Trainable leaves whose shape in the newest checkpoint differs from `skeleton`'s, named.

    Checked from Orbax's metadata before restoring, so a run trained on another backbone fails
    with the tensor names instead of an error from inside Orbax's asynchronous reads.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    step = checkpointer.manager.latest_step()
    if step is None:
        return []
    try:
        saved = ocp.StandardCheckpointHandler().metadata(
            epath.Path(str(checkpointer.directory)) / str(step) / "train")["trainable"]
    except Exception:  # unreadable metadata: restore_latest warns and falls back to an older step
        return []

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in flat}

    have, want = shapes(saved), shapes(skeleton["trainable"])
    return [f"{k}: saved {have.get(k)}, needed {v}" for k, v in want.items() if have.get(k) != v]


def restore_run(run_dir: str | Path, model: LoadedModel) -> TrainedRun:
    """Restore the newest readable checkpoint of `run_dir` onto `model`'s backbone.

    Builds the exact train-state skeleton the trainer saves ({trainable: {lora, mapper},
    opt_state}) from the run's config, so every shape is checked; the optimizer state is
    restored and dropped. Arrays land on the first local device, whichever mesh saved them.
    Imports the training stack (orbax, optax) lazily, here only.
    """
    from psynth_jax.train.checkpointing import Checkpointer
    from psynth_jax.train.step import make_optimizer

    cfg = run_config(run_dir)
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoints/ in run directory {run_dir}")
    lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    dtype = parse_dtype(model.dtype_name)
    abstract = nnx.eval_shape(lambda: Decoder(model.cfg, lora=lora, dtype=dtype, rngs=nnx.Rngs(0)))
    _, lora_state, _ = nnx.split(abstract, LoRAParam, ...)
    mdef, mapper_state = nnx.split(make_mapper(cfg.mapper.kind, model.cfg.num_kv_heads, cfg.mapper.hidden))
    trainable = {"lora": lora_state, "mapper": mapper_state}
    t = cfg.train
    tx = make_optimizer(t.lr, t.steps, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                        decay=t.decay, clip_norm=t.clip_norm, grad_accum=t.grad_accum)
    skeleton = jax.eval_shape(lambda tr: {"trainable": tr, "opt_state": tx.init(tr)}, trainable)
    # restore onto one device, whatever mesh the run was saved from (Orbax needs the target topology)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    skeleton = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), skeleton)
    target = f"{model.source} ({model.cfg.family}, {model.cfg.num_layers} layers)"
    checkpointer = Checkpointer(run_dir, async_save=False)
    try:
        mismatches = _shape_mismatches(checkpointer, skeleton)
        if mismatches:
            raise AdapterError(f"run {run_dir} (trained on {cfg.model.source}) does not fit {target}: "
                               + "; ".join(mismatches[:3]))
        got = checkpointer.restore_latest(skeleton)
    finally:
        checkpointer.close()
    if got is None:
        raise AdapterError(f"no checkpoint in {run_dir} could be restored onto {target} with {describe_lora(lora)} "
                           f"and mapper {cfg.mapper.kind} (see the warnings above)")
    step, state, _ = got
    restored = state["trainable"]
    return TrainedRun(model=with_lora(model, lora, nnx.to_pure_dict(restored["lora"])),
                      mapper=nnx.merge(mdef, restored["mapper"]), step=step, config=cfg)


# ------------------------------------------------------------------------------- demo hook
def load_adapter_into(synth: ParallelSynthesis, path: str | Path) -> str:
    """Load a `psynth train` run dir or an adapter dir into a ParallelSynthesis; describe it in one line.

    The LoRA replaces the weights of `synth.model` in place: the pipeline and its generator hold
    that same LoadedModel, so both see the adapter. The mapper goes through `synth.set_mapper`.
    An adapter dir without a mapper file keeps the synthesizer's current mapper.
    """
    p = Path(path)
    if (p / "config.yaml").is_file():
        run = restore_run(p, synth.model)
        model, mapper = run.model, run.mapper
        what = f"trained: run {p} step {run.step}, mapper {mapper.kind}"
    elif (p / ADAPTER_CONFIG).is_file():
        model = load_peft_adapter(synth.model, p)
        found = mapper_file(p)
        mapper = load_mapper(found, synth.cfg.num_kv_heads) if found else synth.mapper
        source = f"({found.name})" if found else "(none in the adapter dir: kept)"
        what = f"adapter: {p}, mapper {mapper.kind} {source}"
    else:
        raise FileNotFoundError(f"{p} is neither a `psynth train` run directory (config.yaml) nor an "
                                f"adapter directory ({ADAPTER_CONFIG})")
    synth.set_mapper(mapper)
    synth.model.graphdef, synth.model.state, synth.model.lora = model.graphdef, model.state, model.lora
    return f"{what}, {describe_lora(model.lora)}"
