"""Export for PyTorch: a merged transformers checkpoint, a PEFT adapter, the cache mapper's tensors.

- `export_merged`: the LoRA folded into the base weights (W + (alpha / r) A B, in float32) and
  written as a transformers directory (config.json, model.safetensors or shards + index,
  generation_config.json, tokenizer files) that `AutoModelForCausalLM.from_pretrained` loads.
- `export_adapter`: the LoRA as a PEFT adapter (adapter_config.json + adapter_model.safetensors,
  loadable by `peft.PeftModel.from_pretrained`) and the mapper as mapper.safetensors under the
  reference release's state-dict names (net.0.weight [hidden, 3] ... torch Linear layout,
  out x in) + mapper_config.json. An adapter whose vocabulary was aligned on import (the
  release's embed_tokens / lm_head, adapter.py) carries those tensors again, as PEFT saves them.

Every export records what the weights were trained under in psynth_export.json (and in the
safetensors metadata): the handoff convention and worker stop tokens (synthesis/handoff.py),
the mapper, the LoRA and the backbone, so an import restores the same synthesizer.
The release's own layout (cache_mapper.pt + judger_lora/) is release.py.

Only numpy and safetensors are used (no torch), so a box without torch can export. Tensor names
come from the loader's key table (`LAYER_KEYS` / `GLOBAL_KEYS`); the format constants below are
shared with the importer (adapter.py), so both sides read and write the same names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from psynth_jax.interop.layout import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_RECORD, MAPPER_CONFIG, MAPPER_WEIGHTS, RELEASE_MAPPER,
    RELEASE_MAPPER_CONFIG,
)
from psynth_jax.interop.loader import GLOBAL_KEYS, LAYER_KEYS
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import Mapper

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the *ForCausalLM's attributes
# full embedding / LM head tensors PEFT saves in an adapter when training resized the vocabulary
EMBED_KEY = f"{PEFT_PREFIX}model.embed_tokens.weight"
LM_HEAD_KEY = f"{PEFT_PREFIX}lm_head.weight"
MAX_SHARD_BYTES = 5 * 2**30
# Safetensors metadata of our adapter files (PEFT ignores it): lets the importer reject an adapter
# exported from another family even when the tensor shapes happen to agree.
FAMILY_METADATA = "psynth_family"
HANDOFF_METADATA = "psynth_handoff"  # Handoff.as_dict() as JSON

# mapper leaf inside its `net` -> (release state-dict name, transpose between [in, out] and [out, in])
MAPPER_KEYS: dict[str, tuple[str, bool]] = {
    "w0": ("net.0.weight", True),
    "b0": ("net.0.bias", False),
    "w1": ("net.2.weight", True),
    "b1": ("net.2.bias", False),
}


def lora_module(target: str) -> str:
    """Our LoRA target ("q") -> its module inside a transformers layer ("self_attn.q_proj")."""
    return LAYER_KEYS[(target, "kernel")][0].removesuffix(".weight")


def peft_target(target: str) -> str:
    """Our LoRA target ("q") -> PEFT's `target_modules` entry ("q_proj")."""
    return lora_module(target).rsplit(".", 1)[-1]


def peft_key(layer: int, target: str, which: str) -> str:
    """PEFT's saved tensor name of LoRA `which` ("A" or "B") on `target` in `layer`."""
    return f"{PEFT_PREFIX}model.layers.{layer}.{lora_module(target)}.lora_{which}.weight"


def hf_config(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
    """A transformers config.json dict for `cfg` (read by transformers 4.x and 5.x alike).

    RoPE is written both as transformers 5's `rope_parameters` and as the older `rope_theta` +
    `rope_scaling` pair. Qwen2's q/k/v bias is implied by its model_type.
    """
    s = cfg.rope_scaling
    if s.rope_type == "default":
        scaling = None
    elif s.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    else:
        scaling = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    eos = list(cfg.eos_token_ids)
    c: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if cfg.family == "llama":
        c.update(attention_bias=cfg.attention_bias, mlp_bias=False, pretraining_tp=1)
    else:  # qwen2 / qwen3: full attention in every layer
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                 layer_types=["full_attention"] * cfg.num_layers)
    if cfg.family == "qwen3":
        c["attention_bias"] = cfg.attention_bias
    return c


def _torch_layout(w: np.ndarray, transpose: bool) -> np.ndarray:
    return np.ascontiguousarray(w.T if transpose else w)


def merged_tensors(model: LoadedModel) -> dict[str, np.ndarray]:
    """Every backbone tensor under its transformers name and layout, LoRA folded in (model dtype)."""
    cfg = model.cfg
    pure = nnx.to_pure_dict(model.state)
    layers = pure["layers"]
    out: dict[str, np.ndarray] = {}
    for (module, leaf), (hf_name, transpose) in LAYER_KEYS.items():
        if leaf not in layers.get(module, {}):
            continue  # absent in this family (biases, q/k norms)
        w = np.asarray(layers[module][leaf])
        if leaf == "kernel" and "lora_a" in layers[module]:
            a = np.asarray(layers[module]["lora_a"], np.float32)
            b = np.asarray(layers[module]["lora_b"], np.float32)
            delta = np.einsum("lir,lro->lio", a, b) * np.float32(model.lora.scale)
            w = (w.astype(np.float32) + delta).astype(w.dtype)
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{hf_name}"] = _torch_layout(w[i], transpose)
    for path, (hf_name, transpose) in GLOBAL_KEYS.items():
        node: Any = pure
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:  # lm_head is absent when tied to the embedding
            out[hf_name] = _torch_layout(np.asarray(node), transpose)
    return out


def _save_sharded(tensors: dict[str, np.ndarray], out: Path, max_shard_bytes: int, meta: dict[str, str]) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over `max_shard_bytes`."""
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous export with another sharding
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _generation_config(model: LoadedModel) -> dict[str, Any]:
    """The source checkpoint's generation_config.json when it has one, else bos/eos from the config."""
    src = Path(model.source) / "generation_config.json"
    if src.is_file():
        return json.loads(src.read_text())
    eos = list(model.cfg.eos_token_ids)
    return {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def safetensors_metadata(model: LoadedModel, handoff: Handoff | None) -> dict[str, str]:
    """Header metadata of every safetensors file we write (PEFT and transformers ignore it)."""
    meta = {"format": "pt", FAMILY_METADATA: model.cfg.family}
    if handoff is not None:
        meta[HANDOFF_METADATA] = json.dumps(handoff.as_dict())
    return meta


def mapper_record(mapper: Mapper | None) -> dict[str, Any] | None:
    """The mapper as export records describe it (kind, hidden width, inputs, heads)."""
    if mapper is None:
        return None
    net = nnx.to_pure_dict(nnx.state(mapper))["net"]
    return {"kind": mapper.kind, "hidden": int(np.shape(net["w0"])[1]),
            "metadata_features": getattr(mapper, "metadata_features", "both"),
            "num_kv_heads": getattr(mapper, "num_kv_heads", None)}


def write_export_record(out: Path, model: LoadedModel, *, format: str, handoff: Handoff | None,
                        mapper: Mapper | None, embeddings: bool, source: str) -> Path:
    """psynth_export.json: what an export holds and what it was trained under (read back on import).

    handoff is null when nothing said which convention the weights were trained under.
    """
    lora = model.lora
    record = {
        "format": format,
        "handoff": handoff.as_dict() if handoff is not None else None,
        "mapper": mapper_record(mapper),
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
        "embeddings_vocab": model.cfg.vocab_size if embeddings else None,
        "family": model.cfg.family,
        "base_model": model.source,
        "source": source,
    }
    _write_json(out / EXPORT_RECORD, record)
    return out / EXPORT_RECORD


def export_merged(model: LoadedModel, out_dir: str | Path, tokenizer: Any = None, *, handoff: Handoff | None = None,
                  source: str = "", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` (LoRA folded in, if it has one) as a transformers checkpoint directory.

    The weights keep the model's dtype (the fold itself is computed in float32). `tokenizer`
    (default: the model's own) is saved alongside when there is one. `handoff` (what the LoRA
    was trained under) and `source` are recorded in psynth_export.json and the safetensors metadata.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hf_config(model.cfg, model.dtype_name))
    _save_sharded(merged_tensors(model), out, max_shard_bytes, safetensors_metadata(model, handoff))
    _write_json(out / "generation_config.json", _generation_config(model))
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    write_export_record(out, model, format="merged", handoff=handoff, mapper=None, embeddings=False, source=source)
    return out


def peft_config(model: LoadedModel) -> dict[str, Any]:
    """adapter_config.json for the model's LoRA, as PEFT writes it for a causal LM."""
    lora = model.lora
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.source,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [peft_target(t) for t in lora.targets],
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_tensors(model: LoadedModel, *, embeddings: bool = False) -> dict[str, np.ndarray]:
    """LoRA weights under PEFT's names: lora_A.weight [r, in], lora_B.weight [out, r], float32.

    `embeddings`: also the full embed_tokens / lm_head [V, D] in the model's dtype, as PEFT saves
    them for a resized vocabulary (both names for a tied head, as PEFT does).
    """
    pure = nnx.to_pure_dict(model.state)
    layers = pure["layers"]
    out: dict[str, np.ndarray] = {}
    for t in model.lora.targets:
        a = np.asarray(layers[t]["lora_a"], np.float32)  # [L, in, r]
        b = np.asarray(layers[t]["lora_b"], np.float32)  # [L, r, out]
        for i in range(model.cfg.num_layers):
            out[peft_key(i, t, "A")] = _torch_layout(a[i], True)
            out[peft_key(i, t, "B")] = _torch_layout(b[i], True)
    if embeddings:
        embed = np.asarray(pure["embed"])
        out[EMBED_KEY] = _torch_layout(embed, False)
        out[LM_HEAD_KEY] = _torch_layout(embed if model.cfg.tie_word_embeddings else np.asarray(pure["lm_head"]),
                                         not model.cfg.tie_word_embeddings)
    return out


def write_peft_adapter(model: LoadedModel, out: Path, *, embeddings: bool, handoff: Handoff | None) -> None:
    """adapter_config.json + adapter_model.safetensors of the model's LoRA into `out`."""
    if model.lora is None:
        raise ValueError(f"model {model.source} has no LoRA to export as an adapter")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / ADAPTER_CONFIG, peft_config(model))
    save_file(adapter_tensors(model, embeddings=embeddings), str(out / ADAPTER_WEIGHTS),
              metadata=safetensors_metadata(model, handoff))


def mapper_tensors(mapper: Mapper) -> dict[str, np.ndarray]:
    """The mapper's weights under the release's state-dict names, torch Linear layout."""
    net = nnx.to_pure_dict(nnx.state(mapper))["net"]
    return {name: _torch_layout(np.asarray(net[leaf], np.float32), transpose)
            for leaf, (name, transpose) in MAPPER_KEYS.items()}


def export_mapper(mapper: Mapper, out_dir: str | Path) -> Path:
    """Write mapper.safetensors + mapper_config.json (kind, hidden, metadata_features, num_kv_heads).

    num_kv_heads is null for the release's mapper: its (alpha, beta) broadcast over any heads.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(mapper_tensors(mapper), str(out / MAPPER_WEIGHTS), metadata={"format": "pt"})
    _write_json(out / MAPPER_CONFIG, mapper_record(mapper))
    return out / MAPPER_WEIGHTS


def export_adapter(model: LoadedModel, mapper: Mapper | None, out_dir: str | Path, *, handoff: Handoff | None = None,
                   embeddings: bool = False, source: str = "") -> Path:
    """Write the model's LoRA as a PEFT adapter directory, plus the mapper when given.

    Without a mapper, a mapper left in `out_dir` by an earlier export is removed: a new LoRA is
    never paired with a stale mapper. `embeddings`: carry embed_tokens / lm_head (a vocabulary
    aligned to an imported adapter). `handoff` and `source` go into psynth_export.json.
    """
    out = Path(out_dir)
    write_peft_adapter(model, out, embeddings=embeddings, handoff=handoff)
    if mapper is not None:
        export_mapper(mapper, out)
    else:
        for stale in (MAPPER_WEIGHTS, MAPPER_CONFIG, RELEASE_MAPPER, RELEASE_MAPPER_CONFIG):
            (out / stale).unlink(missing_ok=True)
    write_export_record(out, model, format="psynth", handoff=handoff, mapper=mapper, embeddings=embeddings,
                        source=source)
    return out
