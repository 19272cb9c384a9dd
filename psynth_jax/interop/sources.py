"""Tensor sources: read checkpoint tensors by transformers name, from safetensors or GGUF.

A `TensorSource` exposes an HF-style config dict, each tensor's shape, and
`read(hf_name, index) -> np.ndarray`: the part of the tensor that `index` (a tuple of slices, in
transformers' layout, [out, in] for linear weights) selects, whatever the file format. The
model loader (loader.py) maps those names onto the NNX state and reads exactly the slice each
device shard needs, so a process never holds a whole tensor it only shares:

- safetensors: the file is memory-mapped and the tensor viewed in place from its header's
  offsets (numpy; bfloat16 through ml_dtypes), so a slice reads only the pages it touches;
- GGUF: a quantized matrix is stored by rows (llama.cpp's ne1 = transformers' out dimension),
  so only the selected rows are dequantized.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np
from huggingface_hub import snapshot_download

from psynth_jax.formats.text_files import InputFileError, read_json_object


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not fit the model."""


Index = tuple[slice, ...]


class TensorSource(Protocol):
    def config_dict(self) -> dict[str, Any]: ...

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: Index | None = None) -> np.ndarray: ...


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, which jax uses too)
_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: Any
    shape: tuple[int, ...]
    start: int  # byte offset of the tensor's data in the file


class SafetensorsSource:
    """A transformers checkpoint directory: config.json + model.safetensors or a sharded index."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.dir}")
        config = self.dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {self.dir}")
        self._config = _read_json(config)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
            files = sorted({self.dir / shard for shard in weight_map.values()})
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"checkpoint shard(s) listed in the index are missing: {missing}")
        elif single.is_file():
            weight_map, files = None, [single]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.dir}")
        self._entries: dict[str, _Entry] = {}
        for path in files:
            self._entries.update(read_safetensors_header(path))
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self._entries))
            if lost:
                raise CheckpointError(f"tensors listed in {index} are in none of its shards: {lost[:5]}")
        self._maps: dict[Path, np.memmap] = {}

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """The slice `index` of tensor `name`, read from the memory-mapped file (a copy)."""
        e = self._entries[name]
        if e.path not in self._maps:
            self._maps[e.path] = np.memmap(e.path, dtype=np.uint8, mode="r")
        count = int(np.prod(e.shape, dtype=np.int64))
        try:
            raw = self._maps[e.path][e.start : e.start + count * np.dtype(e.dtype).itemsize]
            view = raw.view(e.dtype).reshape(e.shape)
        except ValueError as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {e.path} (truncated or corrupt?): {err}") from err
        return np.array(view[index if index is not None else ...])


def _read_json(path: Path) -> Any:
    """A JSON object file (config.json, the shard index); errors name the file, line and column."""
    try:
        return read_json_object(path)
    except InputFileError as err:
        raise CheckpointError(str(err)) from None


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Every tensor's dtype, shape and data offset in one .safetensors file (its JSON header).

    The format: 8 bytes little-endian header length N, N bytes of JSON, then the data; each
    tensor's `data_offsets` are relative to the end of the header.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {err}") from err
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize or 8 + n + end > size:
            raise CheckpointError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): its data "
                                  f"[{begin}, {end}) does not fit the file of {size} bytes")
        out[name] = _Entry(path, dtype, shape, 8 + n + begin)
    return out


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
        import gguf  # GGUF files only: a box that reads none may lack the package (the GPU check's does)

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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """Stored row of each transformers row, where llama.cpp permuted them (llama q/k), else None."""
        if self._config["model_type"] != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        n = self._config["num_attention_heads"] if "q_proj" in name else self._config["num_key_value_heads"]
        return _reverse_permute(np.arange(rows), n)

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """Dequantize only the rows `index` selects (a matrix is stored row by row), then its columns."""
        from gguf.quants import dequantize  # GGUF files only (see __init__)

        t = self._tensors[name]
        shape = self.shape(name)
        index = index if index is not None else full_index(shape)
        rows = np.arange(shape[0])[index[0]]
        order = self._row_order(name, shape[0])
        stored = rows if order is None else order[rows]
        try:
            data = np.asarray(t.data)
            part = data[stored] if len(shape) > 1 else data
            w = np.asarray(dequantize(part, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize {t.name} in {self.path}: {e}") from e
        if len(shape) == 1:
            return np.array(w.reshape(-1)[index[0]])
        return np.array(w.reshape(len(rows), shape[1])[:, index[1]])


def open_source(source: str | Path) -> TensorSource:
    """A .gguf file, a local transformers directory, or a hub id (downloaded, then the same path)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if path.exists():
        return SafetensorsSource(path)
    if str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint path not found: {source}")
    try:
        local = snapshot_download(
            str(source), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
        )
    except Exception as err:  # noqa: BLE001 - no network, no such repo, a gated one: the same answer
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"model {str(source)!r} (--model / model.source) is not a built-in name (smollm2-135m), a local path "
            f"or a reachable hub id ({type(err).__name__}: {reason[:200]})") from None
    return SafetensorsSource(local)
