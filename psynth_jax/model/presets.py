"""Named model shapes: the real Hugging Face architectures, plus tiny shapes for CPU runs.

Each real preset is the relevant subset of the model's published `config.json`, built through
`ModelConfig.from_hf` exactly like a downloaded checkpoint would be, so a preset and the real
checkpoint give the same `ModelConfig`. Presets carry shapes only, never weights: they are for
benchmarks (timing does not depend on weight values) and for sizing memory.

    >>> from psynth_jax.model.presets import preset
    >>> preset("qwen3-8b").num_params()
    8190735360
"""

from __future__ import annotations

from typing import Any

from psynth_jax.model.config import ModelConfig

# name -> (hub id the shapes were read from, config.json subset)
_HF_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    )),
    "qwen3-8b": ("Qwen/Qwen3-8B", dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    )),
    "qwen3-14b": ("Qwen/Qwen3-14B", dict(
        model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    )),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
    )),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=False, attention_bias=False, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    )),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )),
}

# Tiny shapes for CPU benchmarks and tests (no published checkpoint: synthetic, random weights).
# Each keeps its family's features (Llama: plain GQA; Qwen2: q/k/v bias; Qwen3: q/k RMSNorm).
_TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
             max_position_embeddings=32768, tie_word_embeddings=False)
_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(_TINY, model_type="llama", rope_theta=500000.0),
    "tiny-qwen2": dict(_TINY, model_type="qwen2", rope_theta=1000000.0),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", rope_theta=1000000.0),
}

PRESETS: tuple[str, ...] = tuple(_HF_CONFIGS) + tuple(_TINY_CONFIGS)


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named architecture (case-insensitive); see `PRESETS`."""
    key = name.strip().lower()
    if key in _HF_CONFIGS:
        return ModelConfig.from_hf(_HF_CONFIGS[key][1])
    if key in _TINY_CONFIGS:
        return ModelConfig.from_hf(_TINY_CONFIGS[key])
    raise ValueError(f"unknown architecture {name!r}; known presets: {', '.join(PRESETS)}")


def hub_id(name: str) -> str | None:
    """The Hugging Face repository a preset's shapes come from (None for synthetic tiny shapes)."""
    key = name.strip().lower()
    if key not in _HF_CONFIGS and key not in _TINY_CONFIGS:
        preset(name)  # raises the listing error
    return _HF_CONFIGS[key][0] if key in _HF_CONFIGS else None
