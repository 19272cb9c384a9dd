"""The roofline cost model of one forward pass: what TTFT (or a decode step) could be at best.

A `Roofline` is a device's measured matmul peak and memory bandwidth (measured by
benchmarks/roofline.py, `psynth bench roofline`; stored as roofline.json). The cost model of
a forward over `new` tokens of one request that attends to `past` cached keys (`forward_flops`,
`weight_bytes`, `kv_bytes`) gives each synthesis path a floor:

    floor_ms = 1000 * max(bytes / measured bandwidth, FLOPs / measured matmul peak)

What is counted (everything else is left out, so the floor is a lower bound):

- FLOPs, per request: 2 x (matmul weights of every block: q, k, v, o, gate, up, down) per new
  token; attention 4 x heads x head_dim per (query, key) pair that is really attended (the new
  tokens to every past key, and causally among themselves: new * past + new * (new + 1) / 2
  pairs; QK^T and PV, 2 FLOPs per multiply-add each); the LM head 2 x hidden x vocab for each
  token whose logits are computed (1: TTFT needs the last token only); LoRA 2 x rank x (in + out)
  per target per layer per new token when on. Not counted: norms, RoPE, biases, softmax,
  activation functions, the embedding gather, padded/masked attention slots.
- Bytes: every weight read once (all parameters except the input embedding table, of which only
  `new` rows are gathered; a tied table is read once as the LM head), plus LoRA A/B when on, plus
  the K/V of every token in the final cache (branch tokens read, prompt tokens written) at the
  cache dtype: 2 (K and V) x layers x kv_heads x head_dim x tokens x bytes. Not counted:
  activations, empty decode slots, the cache preparation's own traffic (`prepare_bytes`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from psynth_jax.model.config import ModelConfig

SCHEMA_VERSION = 1
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Measured throughput of one device: matmul FLOP/s and memory bytes/s (medians, best size)."""

    matmul_flops_per_s: float
    bandwidth_bytes_per_s: float
    dtype: str
    platform: str
    device_kind: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def peak_tflops(self) -> float:
        return self.matmul_flops_per_s / 1e12

    @property
    def bandwidth_gbs(self) -> float:
        return self.bandwidth_bytes_per_s / 1e9

    def floor_ms(self, bytes_: float, flops: float) -> float:
        return floor_ms(bytes_, flops, self)

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "roofline", "schema_version": SCHEMA_VERSION, **dataclasses.asdict(self),
                "peak_tflops": self.peak_tflops, "bandwidth_gbs": self.bandwidth_gbs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Roofline":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def load_roofline(path: str | Path) -> Roofline:
    """A Roofline from a roofline.json (`psynth bench roofline`) or a ttft.json holding one."""
    data = json.loads(Path(path).read_text())
    if "matmul_flops_per_s" not in data:
        data = (data.get("metadata") or {}).get("roofline") or {}
    if "matmul_flops_per_s" not in data:
        raise ValueError(f"{path} holds no roofline (expected a roofline.json or a ttft.json with metadata.roofline)")
    return Roofline.from_dict(data)


def write_roofline(path: str | Path, roofline: Roofline) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(roofline.to_dict(), indent=2, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------ cost model
def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}") from None


def block_matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights of one block: q, k, v, o projections and the gated MLP (no biases, no norms)."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f


def lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA target's base projection."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}


def lora_params(cfg: ModelConfig, rank: int, targets: Sequence[str] = ("q", "k", "v", "o")) -> int:
    """LoRA A [in, r] + B [r, out] over every target of every layer (0 when rank is 0)."""
    shapes = lora_shapes(cfg)
    return cfg.num_layers * rank * sum(sum(shapes[t]) for t in targets) if rank else 0


def streamed_params(cfg: ModelConfig) -> int:
    """Parameters a forward reads in full: all but the untied input embedding table (gathered by row)."""
    return cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def weight_bytes(cfg: ModelConfig, nbytes: int, *, lora_rank: int = 0,
                 lora_targets: Sequence[str] = ("q", "k", "v", "o")) -> int:
    """Bytes of weights one forward reads (see `streamed_params`), + the LoRA when it is on."""
    return nbytes * (streamed_params(cfg) + lora_params(cfg, lora_rank, lora_targets))


def kv_bytes(cfg: ModelConfig, tokens: int, nbytes: int, *, batch: int = 1) -> int:
    """K and V of `tokens` tokens in every layer: 2 x layers x kv_heads x head_dim x tokens x bytes."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens * batch * nbytes


def attention_pairs(new: int, past: int) -> int:
    """(query, key) pairs attended: every new token to every past key, causally among the new."""
    return new * past + new * (new + 1) // 2


def forward_flops(cfg: ModelConfig, new: int, past: int = 0, *, batch: int = 1, logits_tokens: int = 1,
                  lora_rank: int = 0, lora_targets: Sequence[str] = ("q", "k", "v", "o")) -> int:
    """FLOPs of a forward over `new` tokens per request after `past` cached keys (see module doc)."""
    linear = 2 * new * cfg.num_layers * block_matmul_params(cfg)
    lora = 2 * new * lora_params(cfg, lora_rank, lora_targets)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attention_pairs(new, past)
    head = 2 * logits_tokens * cfg.hidden_size * cfg.vocab_size
    return batch * (linear + lora + attn + head)


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def floor_ms(self, roofline: Roofline) -> float:
        return floor_ms(self.bytes, self.flops, roofline)


def text_path_cost(cfg: ModelConfig, k: int, l: int, prompt: int, *, batch: int = 1, nbytes: int) -> Cost:
    """Text synthesis TTFT: prefill of K*L + prompt tokens from an empty cache, LoRA off."""
    t = k * l + prompt
    return Cost(forward_flops(cfg, t, 0, batch=batch),
                weight_bytes(cfg, nbytes) + kv_bytes(cfg, t, nbytes, batch=batch))


def cache_path_cost(cfg: ModelConfig, k: int, l: int, prompt: int, *, batch: int = 1, nbytes: int,
                    lora_rank: int = 16, lora_targets: Sequence[str] = ("q", "k", "v", "o")) -> Cost:
    """Cache synthesis TTFT: prompt over K*L cached branch tokens, LoRA on (preparation not counted)."""
    return Cost(forward_flops(cfg, prompt, k * l, batch=batch, lora_rank=lora_rank, lora_targets=lora_targets),
                weight_bytes(cfg, nbytes, lora_rank=lora_rank, lora_targets=lora_targets)
                + kv_bytes(cfg, k * l + prompt, nbytes, batch=batch))


def prepare_bytes(cfg: ModelConfig, k: int, l: int, *, batch: int = 1, nbytes: int) -> int:
    """Cache preparation as a separate pass (re-encode + mapper + pack): reads and writes the branch KV once."""
    return 2 * kv_bytes(cfg, k * l, nbytes, batch=batch)


def floor_ms(bytes_: float, flops: float, roofline: Roofline) -> float:
    """max(bytes / bandwidth, FLOPs / matmul peak), in ms."""
    return 1e3 * max(bytes_ / roofline.bandwidth_bytes_per_s, flops / roofline.matmul_flops_per_s)
