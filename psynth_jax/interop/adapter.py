"""Read the parts of trained synthesizer weights: a PEFT LoRA (with its embeddings), a cache mapper.

- LoRA: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors). An adapter
  may also carry full `embed_tokens` / `lm_head` tensors: PEFT saves them when training resized
  the vocabulary, and the reference release's adapter does (151,669 rows, the tokenizer's size,
  against Qwen3's padded 151,936). The release then runs `align_model_vocab_to_adapter`
  (`resize_token_embeddings` to the adapter's size) before `PeftModel.from_pretrained`, which
  loads those tensors over the base model's embedding and LM head, for workers and synthesizer
  alike. `align_vocabulary` does exactly that here.
- Mapper: our mapper.safetensors (+ mapper_config.json) or the release's cache_mapper.pt (read
  without torch, torch_pickle.py), with the release's hidden_dim / metadata_features variants.

Everything is checked against the model before anything is built; a mismatch raises
`AdapterError` naming the file, the tensor and both shapes (or both configs). Which files make up
one set of weights is layout.py's business, assembling them importer.py's.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from psynth_jax.interop.export import EMBED_KEY, FAMILY_METADATA, LM_HEAD_KEY, MAPPER_KEYS, peft_key, peft_target
from psynth_jax.interop.layout import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAPPER_CONFIG, MAPPER_WEIGHTS, RELEASE_MAPPER, RELEASE_MAPPER_CONFIG,
    read_json_object,
)
from psynth_jax.interop.torch_pickle import TorchFileError, read_torch_state_dict
from psynth_jax.model.loaded import LoadedModel, parse_dtype
from psynth_jax.model.sharding import state_shardings
from psynth_jax.model.transformer import LORA_TARGETS, Decoder, LoRAConfig, LoRAParam
from psynth_jax.synthesis.mapper import METADATA_FEATURES, Mapper, make_mapper


class AdapterError(ValueError):
    """An adapter, mapper or run directory does not fit the model (or is malformed)."""


def describe_lora(lora: LoRAConfig) -> str:
    """A LoRA in one line, e.g. "LoRA r16/a32 on q,k,v,o"."""
    return f"LoRA r{lora.rank}/a{lora.alpha:g} on {','.join(lora.targets)}"


def describe_mapper(mapper: Mapper) -> str:
    """A mapper in a few words: its kind, plus the release's input ablation when not the default."""
    features = getattr(mapper, "metadata_features", "both")
    return mapper.kind + ("" if features == "both" else f" (metadata_features {features})")


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


def without_trained_lora(model: LoadedModel) -> LoadedModel:
    """`model` with its LoRA (default: r16/a32 on q,k,v,o) set to A = B = 0: the synthesizer then
    computes what the backbone does, as the release does for a checkpoint without judger_lora/."""
    lora = model.lora or LoRAConfig()
    dims = _lora_dims(model, lora)
    n = model.cfg.num_layers
    return with_lora(model, lora, {"layers": {
        t: {"lora_a": np.zeros((n, d_in, lora.rank), np.float32), "lora_b": np.zeros((n, lora.rank, d_out), np.float32)}
        for t, (d_in, d_out) in dims.items()}})


def read_peft_config(adapter_dir: str | Path) -> LoRAConfig:
    """rank / alpha / targets of a PEFT LoRA adapter directory; rejects options we do not implement."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {d}")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {d}: not a PEFT adapter directory")
    try:
        c = read_json_object(path)
    except ValueError as e:
        raise AdapterError(str(e)) from e
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
    if "r" not in c or "lora_alpha" not in c:
        raise AdapterError(f"{path}: no 'r' / 'lora_alpha' fields")
    return LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), targets=targets)


def _check_expected(lora: LoRAConfig, expect: LoRAConfig | None, where: Path) -> None:
    if expect is None:
        return
    if (lora.rank, lora.alpha, set(lora.targets)) != (expect.rank, expect.alpha, set(expect.targets)):
        raise AdapterError(f"adapter {where} has {describe_lora(lora)}; expected {describe_lora(expect)}")


@dataclasses.dataclass
class PeftWeights:
    """A PEFT adapter read and checked against a model, not yet applied."""

    path: Path  # the adapter directory
    lora: LoRAConfig
    layers: dict[str, dict[str, np.ndarray]]  # target -> {"lora_a": [L, in, r], "lora_b": [L, r, out]}
    embed: np.ndarray | None  # the adapter's embed_tokens [V, D], when it carries one
    lm_head: np.ndarray | None  # the adapter's lm_head [V, D] (torch layout), when it carries one
    metadata: dict[str, str]  # the safetensors header's metadata

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary of the embeddings the adapter carries (None: it carries none)."""
        for t in (self.embed, self.lm_head):
            if t is not None:
                return int(t.shape[0])
        return None


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # SafetensorError and friends for truncated / corrupt files
        raise AdapterError(f"cannot read {path} (truncated or corrupt safetensors file?): {e}") from e


def _tensor(f: Any, name: str, path: Path) -> np.ndarray:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise AdapterError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): {e}") from e


def read_peft_adapter(model: LoadedModel, adapter_dir: str | Path, *,
                      expect: LoRAConfig | None = None) -> PeftWeights:
    """Read a PEFT adapter directory and check every tensor against `model`; build nothing.

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
    with _open_safetensors(path) as f:
        metadata = dict(f.metadata() or {})
        family = metadata.get(FAMILY_METADATA)
        if family is not None and family != cfg.family:
            raise AdapterError(f"adapter {d} was exported from a {family} model; this model is {cfg.family}")
        names = set(f.keys())
        layer_ids = {int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))}
        if layer_ids and max(layer_ids) + 1 != cfg.num_layers:
            raise AdapterError(f"adapter {d} holds LoRA weights for {max(layer_ids) + 1} layers; "
                               f"the model ({model.source}) has {cfg.num_layers}")
        expected = {peft_key(i, t, w) for i in range(cfg.num_layers) for t in lora.targets for w in "AB"}
        unexpected = names - expected - {EMBED_KEY, LM_HEAD_KEY}
        if unexpected:
            raise AdapterError(f"adapter {path} has unexpected tensors for {describe_lora(lora)}: "
                               f"{sorted(unexpected)[:5]}")
        if expected - names:
            raise AdapterError(f"adapter {path} lacks tensors {sorted(expected - names)[:5]}")
        dims = _lora_dims(model, lora)
        layers = {}
        for t in lora.targets:
            d_in, d_out = dims[t]
            a = [_get(f, peft_key(i, t, "A"), (lora.rank, d_in), path) for i in range(cfg.num_layers)]
            b = [_get(f, peft_key(i, t, "B"), (d_out, lora.rank), path) for i in range(cfg.num_layers)]
            layers[t] = {"lora_a": np.stack([x.T for x in a]), "lora_b": np.stack([x.T for x in b])}
        embed = _tensor(f, EMBED_KEY, path) if EMBED_KEY in names else None
        lm_head = _tensor(f, LM_HEAD_KEY, path) if LM_HEAD_KEY in names else None
    weights = PeftWeights(d, lora, layers, embed, lm_head, metadata)
    _check_vocabulary(model, weights, path)
    return weights


def _check_vocabulary(model: LoadedModel, w: PeftWeights, path: Path) -> None:
    """The release's `align_model_vocab_to_adapter` preconditions, plus what it leaves unchecked."""
    cfg = model.cfg
    sizes = {name: t.shape for name, t in ((EMBED_KEY, w.embed), (LM_HEAD_KEY, w.lm_head)) if t is not None}
    if not sizes:
        return
    for name, shape in sizes.items():
        if len(shape) != 2 or shape[1] != cfg.hidden_size:
            raise AdapterError(f"{path}: tensor {name!r} has shape {tuple(shape)}; the model's hidden size is "
                               f"{cfg.hidden_size}")
    vocab = {shape[0] for shape in sizes.values()}
    if len(vocab) != 1:
        raise AdapterError(f"{path}: embed_tokens and lm_head disagree on the vocabulary size: {sorted(vocab)}")
    v = vocab.pop()
    if v > cfg.vocab_size:
        raise AdapterError(f"{path} carries embeddings for a vocabulary of {v} tokens, larger than the model's "
                           f"{cfg.vocab_size} ({model.source}): not an adapter of this backbone")
    tokenizer = len(model.tokenizer) if model.tokenizer is not None else None
    if tokenizer is not None and tokenizer > v:
        raise AdapterError(f"{path} carries embeddings for {v} tokens, fewer than the tokenizer's {tokenizer} "
                           "(the release refuses this too)")
    if cfg.tie_word_embeddings and w.embed is not None and w.lm_head is not None \
            and not np.array_equal(w.embed, w.lm_head):
        raise AdapterError(f"{path}: the model ties lm_head to embed_tokens, but the adapter's two differ")


def align_vocabulary(model: LoadedModel, embed: np.ndarray | None, lm_head: np.ndarray | None) -> LoadedModel:
    """`model` with the vocabulary of the given embedding / LM-head rows ([V, D], torch layout).

    What `resize_token_embeddings(V)` then `PeftModel.from_pretrained` do in the release: the
    backbone's embedding and head become V rows; a tensor given replaces the model's, one not
    given keeps the model's first V rows (a tied head follows the embedding). Workers and the
    synthesizer both see the result (it is the backbone, not the LoRA). Other arrays are shared.
    """
    if model.cfg.tie_word_embeddings and embed is None:
        embed = lm_head  # loading a tied head writes the one shared matrix
    rows = embed if embed is not None else lm_head
    if rows is None:
        raise ValueError("align_vocabulary needs an embedding or an LM head")
    v = int(rows.shape[0])
    cfg = dataclasses.replace(model.cfg, vocab_size=v)
    dtype = parse_dtype(model.dtype_name)
    rules = model.rules
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Decoder(cfg, lora=model.lora, dtype=dtype, rules=rules, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(model.state)
    pure["embed"] = jnp.asarray(embed, dtype) if embed is not None else pure["embed"][:v]
    if not cfg.tie_word_embeddings:
        pure["lm_head"] = jnp.asarray(lm_head.T, dtype) if lm_head is not None else pure["lm_head"][:, :v]
    shardings = state_shardings(state, model.mesh, rules) if model.mesh is not None else None
    nnx.replace_by_pure_dict(state, pure)
    if shardings is not None:  # the new rows where the model's sharding rules put them
        state = jax.device_put(state, shardings)
    return dataclasses.replace(model, cfg=cfg, graphdef=graphdef, state=state)


def apply_peft_adapter(model: LoadedModel, w: PeftWeights) -> LoadedModel:
    """`model` with the adapter's LoRA and, when it carries them, its embeddings (vocabulary aligned)."""
    out = with_lora(model, w.lora, {"layers": w.layers})
    if w.vocab_size is not None:
        out = align_vocabulary(out, w.embed, w.lm_head)
    return out


def load_peft_adapter(model: LoadedModel, adapter_dir: str | Path, *,
                      expect: LoRAConfig | None = None) -> LoadedModel:
    """`model` with the LoRA of a PEFT adapter directory (rank, alpha, targets from its config) and
    the embeddings it carries, if any. `expect`: the LoRA the caller requires."""
    return apply_peft_adapter(model, read_peft_adapter(model, adapter_dir, expect=expect))


def _lora_dims(model: LoadedModel, lora: LoRAConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every LoRA target's projection, from the model's kernels."""
    layers = nnx.to_pure_dict(model.state)["layers"]
    return {t: tuple(np.shape(layers[t]["kernel"])[1:]) for t in lora.targets}


def _get(f: Any, name: str, want: tuple[int, ...], path: Path) -> np.ndarray:
    w = _tensor(f, name, path)
    if tuple(w.shape) != want:
        raise AdapterError(f"{path}: tensor {name!r} has shape {tuple(w.shape)}, the model expects {want}")
    return w.astype(np.float32)


# ---------------------------------------------------------------------------------- mapper
def load_mapper(path: str | Path, num_kv_heads: int, *, settings: Mapping[str, Any] | None = None) -> Mapper:
    """A mapper from mapper.safetensors (ours), cache_mapper.pt (the release) or a directory with one.

    Ours: the kind, hidden width and inputs come from mapper_config.json beside it when present,
    else from the shapes (output width 4: the release's affine_length mapper; 4 x num_kv_heads: a
    per-head mapper). The release's: `settings` (hidden_dim, metadata_features; default: its
    cache_mapper_config.json beside it), checked against the tensors; without them the shapes
    decide (3 inputs: "both", 1: "none"; 2 inputs need the setting to tell "length" from
    "num_agents").
    """
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in (MAPPER_WEIGHTS, RELEASE_MAPPER) if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no {MAPPER_WEIGHTS} or {RELEASE_MAPPER} in {p}")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"mapper file not found: {p}")
    if p.suffix == ".safetensors":
        with _open_safetensors(p) as f:
            tensors = {name: _tensor(f, name, p) for name in f.keys()}
        config_path = p.parent / MAPPER_CONFIG
        config = _json(config_path) if config_path.is_file() else {}
        release = False
    else:
        try:
            tensors = read_torch_state_dict(p)
        except TorchFileError as e:
            raise AdapterError(str(e)) from e
        if settings is None:
            config_path = p.parent / RELEASE_MAPPER_CONFIG
            settings = _json(config_path) if config_path.is_file() else {}
        config = {"kind": "affine_length", "hidden": settings.get("hidden_dim"),
                  "metadata_features": settings.get("metadata_features")}
        release = True
    return _mapper_from_tensors(tensors, num_kv_heads, config, p, release)


def _json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise AdapterError(str(e)) from e


def _mapper_from_tensors(tensors: dict[str, np.ndarray], num_kv_heads: int, config: dict[str, Any],
                         where: Path, release: bool) -> Mapper:
    names = {name for name, _ in MAPPER_KEYS.values()}
    if set(tensors) != names:
        raise AdapterError(f"mapper {where}: expected tensors {sorted(names)}, found {sorted(tensors)}")
    for name, t in tensors.items():
        if t.ndim != (2 if name.endswith("weight") else 1):
            raise AdapterError(f"mapper {where}: tensor {name!r} has shape {tuple(t.shape)}")
    hidden, n_in = tensors["net.0.weight"].shape
    n_out = tensors["net.2.weight"].shape[0]
    if release and n_out != 4:
        raise AdapterError(f"mapper {where}: net.2.weight has {n_out} outputs; the release's mapper has 4 "
                           "(alpha_k, beta_k, alpha_v, beta_v)")
    if config.get("hidden") is not None and int(config["hidden"]) != hidden:
        raise AdapterError(f"mapper {where} is {hidden} wide (net.0.weight {tuple(tensors['net.0.weight'].shape)}) "
                           f"but its config says hidden {config['hidden']}")
    features = config.get("metadata_features")
    if features is None:
        modes = [mode for mode, cols in METADATA_FEATURES.items() if len(cols) == n_in]
        if not modes:
            raise AdapterError(f"mapper {where}: tensor 'net.0.weight' has shape {tuple(tensors['net.0.weight'].shape)}, "
                               f"expected ({hidden}, 3) (or 2 / 1 inputs for the release's metadata_features ablations)")
        if len(modes) > 1:
            raise AdapterError(f"mapper {where} takes {n_in} inputs: metadata_features {' or '.join(map(repr, modes))}; "
                               f"which one needs {RELEASE_MAPPER_CONFIG} (or run_args.json) beside it")
        features = modes[0]
    if features not in METADATA_FEATURES:
        raise AdapterError(f"mapper {where}: unknown metadata_features {features!r}; the release knows "
                           f"{tuple(METADATA_FEATURES)}")
    if len(METADATA_FEATURES[features]) != n_in:
        raise AdapterError(f"mapper {where} takes {n_in} inputs, but metadata_features {features!r} means "
                           f"{len(METADATA_FEATURES[features])}")
    kind = config.get("kind") or ("affine_length" if n_out == 4 else "per_head_affine")
    heads = config.get("num_kv_heads")
    if kind == "per_head_affine" and heads is not None and heads != num_kv_heads:
        raise AdapterError(f"mapper {where} is a per-head mapper for {heads} KV heads; the model has {num_kv_heads}")
    if kind == "per_head_affine" and n_out != 4 * num_kv_heads:
        raise AdapterError(f"mapper {where} outputs {n_out} values: neither the release's 4 nor "
                           f"4 x {num_kv_heads} KV heads of a per-head mapper for this model")
    try:
        mapper = make_mapper(kind, num_kv_heads, hidden, metadata_features=features)
    except ValueError as e:
        raise AdapterError(f"mapper {where}: {e}") from e
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

