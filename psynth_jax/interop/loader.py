"""Load a checkpoint (transformers dir, hub id, GGUF, or the embedded default) into a Decoder.

The key table below maps each NNX state leaf to its transformers tensor name and layout; shapes
are checked against the config while loading, and a mismatch names the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from psynth_jax.interop.embedded import DEFAULT_MODEL, default_gguf_path
from psynth_jax.interop.sources import CheckpointError, SafetensorsSource, TensorSource, open_source
from psynth_jax.interop.tokenizer import load_tokenizer
from psynth_jax.model.config import ModelConfig, UnsupportedModelError
from psynth_jax.model.loaded import LoadedModel, abstract_decoder, parse_dtype
from psynth_jax.model.sharding import Rules, single_device_mesh, state_shardings
from psynth_jax.model.transformer import LoRAConfig

# NNX path inside `layers` -> (HF name inside model.layers.{i}, transpose to [in, out])
LAYER_KEYS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("q", "kernel"): ("self_attn.q_proj.weight", True),
    ("q", "bias"): ("self_attn.q_proj.bias", False),
    ("k", "kernel"): ("self_attn.k_proj.weight", True),
    ("k", "bias"): ("self_attn.k_proj.bias", False),
    ("v", "kernel"): ("self_attn.v_proj.weight", True),
    ("v", "bias"): ("self_attn.v_proj.bias", False),
    ("o", "kernel"): ("self_attn.o_proj.weight", True),
    ("o", "bias"): ("self_attn.o_proj.bias", False),
    ("q_norm", "scale"): ("self_attn.q_norm.weight", False),
    ("k_norm", "scale"): ("self_attn.k_norm.weight", False),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("gate", "kernel"): ("mlp.gate_proj.weight", True),
    ("up", "kernel"): ("mlp.up_proj.weight", True),
    ("down", "kernel"): ("mlp.down_proj.weight", True),
}
GLOBAL_KEYS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("norm", "scale"): ("model.norm.weight", False),
    ("lm_head",): ("lm_head.weight", True),
}


def _leaf_name(path: tuple[str, ...]) -> tuple[str, bool, bool]:
    """(transformers name, with "{i}" for the layer, transpose, stacked over layers) of an NNX leaf."""
    if path[0] == "layers":
        hf_name, transpose = LAYER_KEYS[path[1:]]
        return f"model.layers.{{i}}.{hf_name}", transpose, True
    hf_name, transpose = GLOBAL_KEYS[path]
    return hf_name, transpose, False


def _check_shape(source: TensorSource, name: str, want: tuple[int, ...]) -> None:
    """The checkpoint's own layout of `name` must be `want` (error names the tensor otherwise)."""
    if name not in source.names():
        raise CheckpointError(f"checkpoint has no tensor {name!r}")
    got = tuple(source.shape(name))
    if got != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {got}, the config expects {tuple(want)}")


def read_leaf(source: TensorSource, path: tuple[str, ...], shape: tuple[int, ...], index: tuple[slice, ...],
              dtype: Any) -> np.ndarray:
    """The part `index` (in our layout: [layers,] in, out) of the leaf at `path`, read from `source`.

    Each transformers tensor is read only where `index` selects it: per layer, the transposed
    slice of its [out, in] layout.
    """
    name, transpose, stacked = _leaf_name(path)
    np_dtype = np.dtype(dtype)

    def one(hf_name: str, idx: tuple[slice, ...], want: tuple[int, ...]) -> np.ndarray:
        if transpose:
            _check_shape(source, hf_name, tuple(reversed(want)))
            return source.read(hf_name, tuple(reversed(idx))).T.astype(np_dtype)
        _check_shape(source, hf_name, want)
        return source.read(hf_name, idx).astype(np_dtype)

    if not stacked:
        return one(name, index, shape)
    layers = range(shape[0])[index[0]]
    return np.stack([one(name.format(i=i), index[1:], shape[1:]) for i in layers])


def init_lora(shape: tuple[int, ...], which: str, key: jax.Array) -> jax.Array:
    """A fresh LoRA factor: A ~ he_uniform (fan-in = its input dim), B = 0 (the adapter starts as a no-op)."""
    if which == "lora_b":
        return jnp.zeros(shape, jnp.float32)
    bound = float(np.sqrt(6.0 / shape[-2]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def state_from_source(
    cfg: ModelConfig, source: TensorSource, dtype: jnp.dtype, lora: LoRAConfig | None, seed: int = 0, *,
    mesh: Mesh | None = None, rules: Rules | None = None, progress: Callable[[str], None] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """The Decoder's graphdef and state, every parameter created directly in its NamedSharding.

    `jax.make_array_from_callback` asks for each device's shard; the callback reads just that
    slice from the source (`read_leaf`), so no device ever holds, and no process ever reads, more
    of a tensor than its shards. mesh: default the first local device alone; rules: the sharding
    rules (model/sharding.py), stored in the graphdef.
    """
    mesh = mesh if mesh is not None else single_device_mesh()
    rules = rules if rules is not None else Rules()
    graphdef, abs_state = abstract_decoder(cfg, dtype, lora, rules)
    shardings = state_shardings(abs_state, mesh, rules)
    key = jax.random.key(seed)
    flat = nnx.to_flat_state(abs_state)
    placed = []
    for (path, variable), (_, sharding) in zip(flat, nnx.to_flat_state(shardings)):
        path = tuple(str(k) for k in path)
        spec, target = variable.get_value(), sharding.get_value()
        if path[-1] in ("lora_a", "lora_b"):
            key, sub = jax.random.split(key)
            value = jax.device_put(np.asarray(init_lora(spec.shape, path[-1], sub)), target)  # same on every process
        else:
            value = jax.make_array_from_callback(
                spec.shape, target, lambda index, p=path, shape=spec.shape: read_leaf(source, p, shape, index, dtype))
        placed.append((path, variable.replace(value)))
        if progress is not None:
            progress(".".join(path))
    return graphdef, nnx.from_flat_state(placed)


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    lora: LoRAConfig | None = None,
    with_tokenizer: bool = True,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> LoadedModel:
    """Load a backbone from `source`: "smollm2-135m" (embedded), a .gguf, a local dir or a hub id.

    mesh: where the parameters live, each created in its sharding (default: one device); rules:
    the logical-axis sharding rules (default model/sharding.py's table).
    """
    jdtype = parse_dtype(dtype)
    path = default_gguf_path() if str(source) == DEFAULT_MODEL else source
    src = open_source(path)
    try:
        cfg = ModelConfig.from_hf(src.config_dict())
    except UnsupportedModelError:
        raise
    except ValueError as err:  # a field of the wrong type or missing: name the file and the field
        where = src.dir / "config.json" if isinstance(src, SafetensorsSource) else Path(path)
        raise CheckpointError(f"{where}: {err}") from None
    if lora is not None and lora.rank > cfg.hidden_size:  # before any LoRA tensor is allocated
        raise ValueError(f"lora.rank {lora.rank} exceeds the model's width (hidden_size {cfg.hidden_size} in {path}); "
                         f"use a rank of at most {cfg.hidden_size}")
    mesh = mesh if mesh is not None else single_device_mesh()
    graphdef, state = state_from_source(cfg, src, jdtype, lora, seed, mesh=mesh, rules=rules)
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(path)
    return LoadedModel(cfg, graphdef, state, dtype, str(path), lora, tokenizer, mesh)
