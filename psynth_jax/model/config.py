"""Static model configuration, built from a Hugging Face transformers config.

`ModelConfig` is a frozen, hashable dataclass so it can be a static argument of jitted
functions. It covers the decoder-only families this project supports: Llama (incl. Llama 3.x
rope scaling), Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm, free head_dim).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping

from psynth_jax.formats.text_files import read_json_object

# HF `model_type` -> family name used inside psynth_jax.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """Raised for an architecture or option psynth_jax does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_scaling`/`rope_parameters` describe it."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about its shapes; hashable and immutable."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2 always, Llama/Qwen3 optionally)
    o_bias: bool = False  # bias on o as well (Llama/Qwen3 with attention_bias; never Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def num_params(self) -> int:
        """Parameter count of the backbone (embeddings counted once when tied)."""
        d, h, kv, hd, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * hd * (h + 2 * kv) + h * hd * d
        if self.attention_bias:
            attn += hd * (h + 2 * kv)
        if self.o_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Build from a transformers `PretrainedConfig`, a config.json path/dir, or a dict."""
        if isinstance(hf_config, (str, Path)):
            path = Path(hf_config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            hf_config = read_json_object(path)  # errors name the file and line
        if not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        return cls._from_dict(dict(hf_config))

    @classmethod
    def _from_dict(cls, c: dict[str, Any]) -> "ModelConfig":
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} (architectures={c.get('architectures')}); "
                f"psynth_jax supports: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} "
                "(Llama, Qwen2/2.5, Qwen3 decoders)"
            )
        family = SUPPORTED_MODEL_TYPES[model_type]
        num = functools.partial(_field, c)
        hidden = num("hidden_size")
        heads = num("num_attention_heads")
        head_dim = num("head_dim", hidden // heads)
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_params = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_theta = float(rope_params.get("rope_theta", c.get("rope_theta", 10000.0)))
        if family == "qwen2":
            attention_bias = True
        else:
            attention_bias = bool(c.get("attention_bias", False))
        if c.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        if family == "qwen2" and c.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 sliding-window attention is not supported")
        return cls(
            family=family,
            vocab_size=num("vocab_size"),
            hidden_size=hidden,
            intermediate_size=num("intermediate_size"),
            num_layers=num("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=num("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=num("rms_norm_eps", 1e-6, float),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(rope_params),
            max_position_embeddings=num("max_position_embeddings", 8192),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=attention_bias and family != "qwen2",
            qk_norm=family == "qwen3",
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )


def _field(c: Mapping[str, Any], key: str, default: Any = None, kind: type = int) -> Any:
    """config.json's number `key` (`default` when absent or null): a ValueError naming the field
    for a missing or non-numeric value (a string "two", a bool, a fraction where an int belongs)."""
    value = c.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"field {key!r} is missing")
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    if not ok or (kind is int and value <= 0) or (kind is float and not value > 0):
        raise ValueError(f"field {key!r} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def _rope_scaling(p: Mapping[str, Any]) -> RopeScaling:
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeScaling()
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in p.items() if k in known and v is not None}
    kwargs["rope_type"] = rope_type
    return RopeScaling(**kwargs)
