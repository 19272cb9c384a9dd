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

from psynth_jax.interop.embedded import DEFAULT_MODEL, default_gguf_path
from psynth_jax.interop.sources import CheckpointError, TensorSource, open_source
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.loaded import LoadedModel, abstract_decoder, parse_dtype
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


def _walk(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _fetch(source: TensorSource, name: str, transpose: bool, want: tuple[int, ...]) -> np.ndarray:
    if name not in source.names():
        raise CheckpointError(f"checkpoint has no tensor {name!r}")
    w = source.get(name)
    expect = tuple(reversed(want)) if transpose else tuple(want)  # in the checkpoint's own layout
    if tuple(w.shape) != expect:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(w.shape)}, the config expects {expect}")
    return w.T if transpose else w


def init_lora_leaves(pure: dict, seed: int, dtype: jnp.dtype) -> None:
    """Fill LoRA leaves in place: A ~ he_uniform (per layer), B = 0 (adapter starts as a no-op)."""
    key = jax.random.key(seed)
    for path, leaf in _walk(pure):
        if path[-1] == "lora_b":
            _set(pure, path, jnp.zeros(leaf.shape, dtype))
        elif path[-1] == "lora_a":
            key, sub = jax.random.split(key)
            fan_in = leaf.shape[-2]
            bound = float(np.sqrt(6.0 / fan_in))
            _set(pure, path, jax.random.uniform(sub, leaf.shape, dtype, -bound, bound))


def state_from_source(
    cfg: ModelConfig, source: TensorSource, dtype: jnp.dtype, lora: LoRAConfig | None, seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, abs_state = abstract_decoder(cfg, dtype, lora)
    pure = nnx.to_pure_dict(abs_state)
    for path, leaf in _walk(pure):
        if path[0] == "layers" and path[-1] not in ("lora_a", "lora_b"):
            hf_name, transpose = LAYER_KEYS[path[1:]]
            per_layer = tuple(leaf.shape[1:])
            stacked = np.stack(
                [_fetch(source, f"model.layers.{i}.{hf_name}", transpose, per_layer) for i in range(cfg.num_layers)]
            )
            _set(pure, path, jnp.asarray(stacked, dtype))
        elif path[0] != "layers":
            hf_name, transpose = GLOBAL_KEYS[path]
            _set(pure, path, jnp.asarray(_fetch(source, hf_name, transpose, tuple(leaf.shape)), dtype))
        if progress is not None:
            progress(".".join(path))
    if lora is not None:
        init_lora_leaves(pure, seed, jnp.float32)
    nnx.replace_by_pure_dict(abs_state, pure)
    return graphdef, abs_state


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    lora: LoRAConfig | None = None,
    with_tokenizer: bool = True,
    seed: int = 0,
) -> LoadedModel:
    """Load a backbone from `source`: "smollm2-135m" (embedded), a .gguf, a local dir or a hub id."""
    jdtype = parse_dtype(dtype)
    path = default_gguf_path() if str(source) == DEFAULT_MODEL else source
    src = open_source(path)
    cfg = ModelConfig.from_hf(src.config_dict())
    graphdef, state = state_from_source(cfg, src, jdtype, lora, seed)
    tokenizer = None
    if with_tokenizer:
        from psynth_jax.interop.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    return LoadedModel(cfg, graphdef, state, dtype, str(path), lora, tokenizer)
