"""Roofline of the device and an analytic cost model of one forward pass: what TTFT could be at best.

Two measurements (pure functions, jitted, `block_until_ready`, median of repeats):

- `measure_matmul_peak`: FLOP/s of square matmuls [n, n] @ [n, n] (2 n^3 FLOPs each), in the
  benchmark's dtype (bfloat16 on GPU, float32 on CPU by default); the best size is kept.
- `measure_bandwidth`: bytes/s of device memory, from an elementwise op over a large array
  (`x + 1`: reads and writes the array, 2 x nbytes) and from a full reduction (`sum(x)`: reads
  it once); the better of the two is kept (weights and KV are mostly read).

And a cost model of a forward over `new` tokens of one request that attends to `past` cached
keys (`forward_flops`, `weight_bytes`, `kv_bytes`), which gives each synthesis path a floor:

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

The `add_arguments`/`run` pair at the end is the `psynth bench roofline` subcommand (registered
in psynth_jax/cli/bench.py as a module entry).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from psynth_jax.model.config import ModelConfig

SCHEMA_VERSION = 1
# default sizes: square matmul n, and the bandwidth array in MiB (per platform)
MATMUL_SIZES = {"cpu": (512, 1024), "gpu": (4096, 8192, 16384), "tpu": (4096, 8192, 16384)}
BANDWIDTH_MIB = {"cpu": 64, "gpu": 1024, "tpu": 1024}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------ measurement
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


def _device():
    import jax

    d = jax.devices()[0]
    return d.platform, getattr(d, "device_kind", d.platform)


def default_dtype() -> str:
    """float32 on CPU, bfloat16 on accelerators (as `psynth bench ttft --dtype auto`)."""
    return "float32" if _device()[0] == "cpu" else "bfloat16"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Call fn once (compile), then `repeats` times, each until ready; median seconds."""
    from psynth_jax.inference.timing import time_calls

    return time_calls(fn, repeats).median_s


def measure_matmul_peak(sizes: Sequence[int] | None = None, *, dtype: str | None = None,
                        repeats: int = 10) -> dict[str, Any]:
    """Best FLOP/s over square matmuls of the given sizes: {"flops_per_s", "n", "dtype", "per_size"}.

    Each size: one jitted `a @ b` (output in the input dtype), 2 n^3 FLOPs per call, median of
    `repeats` calls after a compile call.
    """
    import jax
    import jax.numpy as jnp

    dtype = dtype or default_dtype()
    sizes = tuple(sizes or MATMUL_SIZES.get(_device()[0], MATMUL_SIZES["gpu"]))
    mm = jax.jit(lambda a, b: a @ b)
    per_size = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
        b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
        s = _median_seconds(functools.partial(mm, a, b), repeats)
        per_size[str(n)] = {"median_s": s, "flops_per_s": 2.0 * n ** 3 / s}
        del a, b
    best = max(per_size, key=lambda k: per_size[k]["flops_per_s"])
    return {"flops_per_s": per_size[best]["flops_per_s"], "n": int(best), "dtype": dtype, "repeats": repeats,
            "per_size": per_size}


def measure_bandwidth(mib: float | None = None, *, repeats: int = 10) -> dict[str, Any]:
    """Device memory bytes/s over a float32 array of `mib` MiB: {"bytes_per_s", "copy_bytes_per_s",
    "read_bytes_per_s", "nbytes"}. copy: `x + 1` (reads + writes nbytes); read: `sum(x)` (reads
    nbytes). bytes_per_s is the better of the two."""
    import jax
    import jax.numpy as jnp

    mib = float(mib or BANDWIDTH_MIB.get(_device()[0], BANDWIDTH_MIB["gpu"]))
    n = max(int(mib * 2 ** 20 // 4), 1024)
    nbytes = n * 4
    box = [jax.random.normal(jax.random.key(1), (n,), jnp.float32)]
    # in place (donated): a fresh output buffer per call would time the allocator (page faults on CPU)
    copy = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    read = jax.jit(lambda v: jnp.sum(v))

    def copy_once():
        box[0] = copy(box[0])
        return box[0]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        copy_s = _median_seconds(copy_once, repeats)
    read_s = _median_seconds(lambda: read(box[0]), repeats)
    box.clear()
    copy_bw, read_bw = 2.0 * nbytes / copy_s, nbytes / read_s
    return {"bytes_per_s": max(copy_bw, read_bw), "copy_bytes_per_s": copy_bw, "read_bytes_per_s": read_bw,
            "nbytes": nbytes, "repeats": repeats}


def measure_roofline(*, dtype: str | None = None, matmul_sizes: Sequence[int] | None = None,
                     bandwidth_mib: float | None = None, repeats: int = 10) -> Roofline:
    """Measure the first device's matmul peak (in `dtype`) and memory bandwidth."""
    import gc

    platform, kind = _device()
    mm = measure_matmul_peak(matmul_sizes, dtype=dtype, repeats=repeats)
    bw = measure_bandwidth(bandwidth_mib, repeats=repeats)
    gc.collect()
    return Roofline(
        matmul_flops_per_s=mm["flops_per_s"], bandwidth_bytes_per_s=bw["bytes_per_s"], dtype=mm["dtype"],
        platform=platform, device_kind=kind,
        details={"matmul": mm, "bandwidth": bw,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    )


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


def roofline_fields(row: dict[str, Any], cfg: ModelConfig, roofline: Roofline | None, *, dtype: str,
                    lora_rank: int, lora_targets: Sequence[str] = ("q", "k", "v", "o")) -> dict[str, Any]:
    """Per-row cost-model and roofline fields of a ttft row (K, L, prompt_tokens, batch, times in ms).

    Always: text_flops, text_bytes, cache_flops, cache_bytes, prepare_share. With a roofline: the
    floors, the measured/floor ratios, text_mfu, cache_prepare_floor_ms. Ratios only where both
    quotient fields are present (a path that ran out of memory has no time).
    """
    nb = dtype_bytes(dtype)
    k, l, p, b = row["K"], row["L"], row["prompt_tokens"], row.get("batch", 1)
    text = text_path_cost(cfg, k, l, p, batch=b, nbytes=nb)
    cache = cache_path_cost(cfg, k, l, p, batch=b, nbytes=nb, lora_rank=lora_rank, lora_targets=lora_targets)
    out: dict[str, Any] = {"text_flops": text.flops, "text_bytes": text.bytes,
                           "cache_flops": cache.flops, "cache_bytes": cache.bytes}
    if _ok(row.get("cache_prepare_ms")) and _ok(row.get("cache_ttft_ms")):
        out["prepare_share"] = row["cache_prepare_ms"] / row["cache_ttft_ms"]
    if roofline is None:
        return out
    out["cache_floor_ms"] = cache.floor_ms(roofline)
    out["text_floor_ms"] = text.floor_ms(roofline)
    out["cache_prepare_floor_ms"] = 1e3 * prepare_bytes(cfg, k, l, batch=b, nbytes=nb) / roofline.bandwidth_bytes_per_s
    if _ok(row.get("cache_ttft_ms")):
        out["cache_floor_ratio"] = row["cache_ttft_ms"] / out["cache_floor_ms"]
    if _ok(row.get("text_ttft_ms")):
        out["text_floor_ratio"] = row["text_ttft_ms"] / out["text_floor_ms"]
        out["text_mfu"] = text.flops / (row["text_ttft_ms"] / 1e3) / roofline.matmul_flops_per_s
    return out


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


ROOFLINE_DEFINITIONS = {
    "roofline": "measured once per run before the sweep (or read from --roofline-json): matmul_flops_per_s = best "
                "median FLOP/s of square jitted matmuls in the sweep dtype; bandwidth_bytes_per_s = best of a "
                "float32 in-place `x + 1` (2 x nbytes) and `sum(x)` (nbytes) over a large array",
    "text_flops": "cost model FLOPs of the text path: forward over K*L + prompt tokens, LoRA off, logits of the "
                  "last token (psynth_jax/bench/roofline.py: 2 x block matmul params per token + 4 x heads x head_dim "
                  "per causal (query, key) pair + 2 x hidden x vocab)",
    "text_bytes": "weights read once (all but the input embedding table) + K/V of K*L + prompt tokens",
    "cache_flops": "cost model FLOPs of the cache path: prompt tokens over K*L cached keys, LoRA on",
    "cache_bytes": "weights + LoRA read once + K/V of K*L branch tokens (read) and prompt tokens (written); the "
                   "preparation's own traffic is not counted (see cache_prepare_floor_ms)",
    "cache_floor_ms": "max(cache_bytes / bandwidth, cache_flops / matmul peak), ms",
    "cache_floor_ratio": "cache_ttft_ms / cache_floor_ms (1.0 = at the roofline)",
    "text_floor_ms": "max(text_bytes / bandwidth, text_flops / matmul peak), ms",
    "text_floor_ratio": "text_ttft_ms / text_floor_ms",
    "text_mfu": "text_flops / (text_ttft_ms / 1000) / matmul peak: fraction of the measured matmul peak",
    "cache_prepare_floor_ms": "2 x K/V bytes of K*L tokens / bandwidth: the preparation as one read + one write",
    "prepare_share": "cache_prepare_ms / cache_ttft_ms (parts timed separately, so an estimate)",
}


# ------------------------------------------------------------------ `psynth bench roofline`
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="matmul dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--sizes", default="auto",
                   help="square matmul sizes n, comma-separated; auto = 512,1024 on CPU, 4096,8192,16384 on GPU")
    p.add_argument("--mib", default="auto", help="bandwidth array size in MiB; auto = 64 on CPU, 1024 on GPU")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--out", default="runs/bench", help="output directory (roofline.json)")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = None if args.sizes == "auto" else [int(x) for x in args.sizes.split(",") if x]
        mib = None if args.mib == "auto" else float(args.mib)
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated integers and --mib a number (or auto), "
                         f"got {args.sizes!r}, {args.mib!r}") from None
    dtype = None if args.dtype == "auto" else args.dtype
    r = measure_roofline(dtype=dtype, matmul_sizes=sizes, bandwidth_mib=mib, repeats=args.repeats)
    print(format_roofline(r))
    path = write_roofline(Path(args.out) / "roofline.json", r)
    print(f"[bench roofline] wrote {path}", file=sys.stderr)
    return 0


def format_roofline(r: Roofline) -> str:
    mm, bw = r.details.get("matmul", {}), r.details.get("bandwidth", {})
    sizes = ", ".join(f"n={n}: {v['flops_per_s'] / 1e12:.3g}" for n, v in mm.get("per_size", {}).items())
    lines = [
        f"device          {r.device_kind} [{r.platform}]",
        f"matmul peak     {r.peak_tflops:.4g} TFLOP/s ({r.dtype}, best n={mm.get('n', '?')}; TFLOP/s per size: {sizes})",
        f"bandwidth       {r.bandwidth_gbs:.4g} GB/s (copy {bw.get('copy_bytes_per_s', 0) / 1e9:.4g}, "
        f"read {bw.get('read_bytes_per_s', 0) / 1e9:.4g}; {bw.get('nbytes', 0) / 2 ** 20:.0f} MiB float32)",
        f"ridge point     {r.matmul_flops_per_s / r.bandwidth_bytes_per_s:.1f} FLOP/byte",
    ]
    return "\n".join(lines)
