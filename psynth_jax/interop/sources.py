"""Tensor sources: read checkpoint tensors by transformers name, from safetensors or GGUF.

A `TensorSource` exposes an HF-style config dict and `get(hf_name) -> np.ndarray` in
transformers' layout ([out, in] for linear weights), whatever the file format. The model
loader (loader.py) maps those names onto the NNX state, so each format only has to speak
transformers' names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not fit the model."""


class TensorSource(Protocol):
    def config_dict(self) -> dict[str, Any]: ...

    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """A transformers checkpoint directory: config.json + model.safetensors or a sharded index."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.dir}")
        config = self.dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {self.dir}")
        self._config = json.loads(config.read_text())
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.dir / shard for name, shard in weight_map.items()}
        elif single.is_file():
            self._where = {name: single for name in self._keys_of(single)}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.dir}"
            )
        missing = sorted({str(p) for p in self._where.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) listed in the index are missing: {missing}")
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises several error types for damaged files
            raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._where[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="numpy")
            return self._handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): {e}") from e


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFSource:
    """A GGUF file (llama.cpp): metadata -> HF config, dequantized tensors -> HF names/layout."""

    _LAYER = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    _GLOBAL = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:
            raise CheckpointError(f"cannot read GGUF file {self.path} (truncated or corrupt?): {e}") from e
        if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
            raise CheckpointError(
                f"{self.path} stores RoPE scaling as a rope_freqs tensor (llama.cpp's Llama 3.1+ "
                "format), which psynth_jax does not read; load the transformers checkpoint instead"
            )
        self._tensors = {}
        for t in self._reader.tensors:
            hf = self._hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
        self._config = self._build_config()

    def _field(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def _hf_name(self, name: str) -> str | None:
        if name in self._GLOBAL:
            return self._GLOBAL[name]
        parts = name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in self._LAYER:
            return f"model.layers.{parts[1]}.{self._LAYER[parts[2]]}"
        return None

    def _build_config(self) -> dict[str, Any]:
        arch = self._field("general.architecture")
        a = lambda key, default=None: self._field(f"{arch}.{key}", default)  # noqa: E731
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        vocab = a("vocab_size") or len(self._field("tokenizer.ggml.tokens", []))
        cfg = {
            "model_type": arch,
            "architectures": [f"{arch}ForCausalLM"],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(a("feed_forward_length")),
            "num_hidden_layers": int(a("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(a("attention.head_count_kv", heads)),
            "head_dim": int(a("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(a("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(a("context_length", 8192)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        }
        scaling = a("rope.scaling.type")
        if scaling and scaling != "none":
            cfg["rope_scaling"] = {
                "rope_type": scaling,
                "factor": float(a("rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(a("rope.scaling.original_context_length", 8192)),
            }
        return cfg

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize {t.name} in {self.path}: {e}") from e
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = w.reshape(shape) if len(shape) > 1 else w.reshape(-1)
        if self._config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = self._config["num_attention_heads"] if "q_proj" in name else self._config["num_key_value_heads"]
            w = _reverse_permute(w, n)
        return w


def open_source(source: str | Path) -> TensorSource:
    """A .gguf file, a local transformers directory, or a hub id (downloaded, then the same path)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if path.exists():
        return SafetensorsSource(path)
    if str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint path not found: {source}")
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        str(source), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
    )
    return SafetensorsSource(local)
