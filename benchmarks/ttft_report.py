"""`bench ttft`'s rows read: table columns, cost-model and peer fields, definitions, metadata.

The sweep itself (benchmarks/ttft.py) measures the times; everything derived from them or said
about them is here: the printed table (`TABLE_COLUMNS`, `format_row`), the roofline fields of a
row (`roofline_fields`: the analytic costs of psynth_jax/measure/roofline.py, each path's floor,
the measured/floor ratios, the text path's MFU), the PyTorch peer's ratios (`peer_ratios`), and
the JSON metadata with every field's definition (`sweep_metadata`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from benchmarks import harness
from benchmarks.harness import Column, base_metadata
from psynth_jax.measure.roofline import Roofline, cache_path_cost, dtype_bytes, prepare_bytes, text_path_cost
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import LoRAConfig

SCHEMA_VERSION = 4  # 2: roofline/cost-model fields, prepare_share, PyTorch peer fields; 3: cache_path;
# 4: calls alternated per repeat (timing_order, the peer's too), ratios' spreads, the host CPU's kind
CACHE_PATHS = ("view", "materialised")
WEIGHTS_NOTE = "random weights, branch KV and tokens: timing does not depend on their values"

PATHS = ("peer_cache", "peer_text", "cache", "text")  # row key prefixes: `<path>_error` prints OOM
TABLE_COLUMNS: tuple[Column, ...] = (
    ("K", "K", "{:>3d}"),
    ("L", "L", "{:>6d}"),
    ("K*L", "branch_tokens", "{:>7d}"),
    ("reenc+asm", "cache_reencode_assemble_ms", "{:>9.2f}"),  # materialised path only
    ("mapper", "cache_mapper_ms", "{:>7.2f}"),
    ("prepare", "cache_prepare_ms", "{:>8.2f}"),
    ("prefill", "cache_prefill_ms", "{:>8.2f}"),
    ("cache TTFT", "cache_ttft_ms", "{:>10.2f}"),
    ("text TTFT", "text_ttft_ms", "{:>10.2f}"),
    ("text/cache", "speedup", "{:>9.2f}x"),
    ("prep%", "prepare_share", "{:>6.1%}"),
)
# appended when the run measured a roofline / ran the PyTorch peer
ROOFLINE_COLUMNS: tuple[Column, ...] = (
    ("cache floor", "cache_floor_ms", "{:>10.2f}"),
    ("cache/floor", "cache_floor_ratio", "{:>10.2f}x"),
    ("text/floor", "text_floor_ratio", "{:>9.2f}x"),
    ("text MFU", "text_mfu", "{:>7.1%}"),
)
PEER_COLUMNS: tuple[Column, ...] = (
    ("torch text", "peer_text_ttft_ms", "{:>10.2f}"),
    ("torch cache", "peer_cache_ttft_ms", "{:>10.2f}"),
    ("text/torch", "text_vs_peer", "{:>9.2f}x"),
    ("range", "text_vs_peer_spread", "{0[0]:.2f}-{0[1]:.2f}"),
    ("cache/torch", "cache_vs_peer", "{:>10.2f}x"),
    ("range", "cache_vs_peer_spread", "{0[0]:.2f}-{0[1]:.2f}"),
)
# the ratios whose spread over the repeats is reported: name -> (numerator, denominator), each a
# timed function's label (its per-repeat times in times_ms / peer_times_ms) or a row field (ms)
SPREADS: dict[str, tuple[str, str]] = {
    "text_vs_peer": ("text_ttft", "peer_text_ttft"),
    "cache_vs_peer": ("cache_ttft", "peer_cache_ttft"),
    "prepare_share": ("cache_prepare", "cache_ttft"),
    "cache_floor_ratio": ("cache_ttft", "cache_floor_ms"),
    "text_floor_ratio": ("text_ttft", "text_floor_ms"),
}


def table_columns(roofline: bool = False, peer: bool = False) -> tuple[Column, ...]:
    return TABLE_COLUMNS + (ROOFLINE_COLUMNS if roofline else ()) + (PEER_COLUMNS if peer else ())


def peer_ratios(row: dict[str, Any]) -> dict[str, float]:
    """JAX time / PyTorch peer time of each path, and the cache path's speedup over the faster of
    the two text paths (a slow text baseline cannot inflate it), where measured."""
    out = {}
    for path in ("text", "cache"):
        ours, theirs = row.get(f"{path}_ttft_ms"), row.get(f"peer_{path}_ttft_ms")
        if ours is not None and theirs:
            out[f"{path}_vs_peer"] = ours / theirs
    texts = [t for t in (row.get("text_ttft_ms"), row.get("peer_text_ttft_ms")) if t]
    if texts and row.get("cache_ttft_ms"):
        out["speedup_vs_best_text"] = min(texts) / row["cache_ttft_ms"]
    return out


ROOFLINE_DEFINITIONS = {
    "roofline": "measured once per run before the sweep (or read from --roofline-json): matmul_flops_per_s = best "
                "median FLOP/s of square jitted matmuls in the sweep dtype; bandwidth_bytes_per_s = best of a "
                "float32 in-place `x + 1` (2 x nbytes) and `sum(x)` (nbytes) over a large array",
    "text_flops": "cost model FLOPs of the text path: forward over K*L + prompt tokens, LoRA off, logits of the "
                  "last token (psynth_jax/measure/roofline.py: 2 x block matmul params per token + 4 x heads x head_dim "
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
SPREAD_DEFINITIONS = {
    "<ratio>_repeats": "for text_vs_peer, cache_vs_peer, prepare_share, cache_floor_ratio, text_floor_ratio: the "
                       "ratio per repeat, the i-th timed call of the numerator over the i-th of the denominator "
                       "(with --peer-order interleaved the peer's call ran just before JAX's) or over the floor",
    "<ratio>_spread": "[min, max] of <ratio>_repeats (the headline <ratio> is a quotient of medians)",
    "timing_order": "the labels of the timed calls at that point, in the order they ran (after one compile call "
                    "each): rounds of peer text, JAX text, peer cache, JAX cache, then the cache path's parts",
}


def spread_fields(row: dict[str, Any]) -> dict[str, Any]:
    """Each ratio of SPREADS per repeat (`<ratio>_repeats`: the i-th timed call of its numerator
    over the i-th of its denominator, which ran next to it, or over a fixed floor) and its range
    (`<ratio>_spread`: [min, max]), where both sides were timed."""
    times = {**row.get("times_ms", {}), **row.get("peer_times_ms", {})}

    def series(name: str) -> list[float] | None:
        if name in times:
            return times[name]
        value = row.get(name)
        return None if not _ok(value) else [value]

    out: dict[str, Any] = {}
    for ratio, (num, den) in SPREADS.items():
        a, b = series(num), series(den)
        if not a or not b:
            continue
        if len(b) == 1:
            b = b * len(a)
        per = [x / y for x, y in zip(a, b) if y > 0]
        if per:
            out[f"{ratio}_repeats"] = per
            out[f"{ratio}_spread"] = [min(per), max(per)]
    return out


def format_header(columns: Sequence[Column] = TABLE_COLUMNS) -> str:
    return harness.format_header(columns)


def format_row(row: dict[str, Any], columns: Sequence[Column] = TABLE_COLUMNS) -> str:
    """One table line; a path that ran out of memory prints OOM."""
    return harness.format_row(row, columns, PATHS)


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


def sweep_metadata(
    cfg: ModelConfig, *, arch: str, hub: str | None = None, ks: Sequence[int], ls: Sequence[int],
    prompt_tokens: int, batch: int, dtype: str, attn_impl: str, repeats: int, mapper_kind: str,
    lora_rank: int = 16, worker_prompt_tokens: int = 64, new_tokens: int = 64, seed: int = 0,
    warmup: bool = True, command: str | None = None, roofline: Roofline | None = None,
    peer: dict[str, Any] | None = None, cache_path: str = "view",
) -> dict[str, Any]:
    """Everything needed to read (and reproduce) a sweep's rows.

    roofline: the measured Roofline (stored as `roofline`; None: not measured, no floor fields).
    peer: the PyTorch peer's metadata (benchmarks.peer.peer_metadata) when it ran.
    """
    definitions = {
        "cache_path": "view: zero-copy (core.jit_prepare of a BranchView, the prompt attends to worker rows [P | L] "
                      "in place); materialised: the reference (core.jit_prepare over copied-out branch K/V)",
        "cache_reencode_assemble_ms": "materialised only: RoPE re-encoding by -P + packing, no mapper (own jit)",
        "cache_mapper_ms": "materialised only: cache mapper alone on the branch K/V (own jit)",
        "cache_prepare_ms": "view: core.jit_prepare of the view (mapper scalars + the synthesizer's empty cache); "
                            "materialised: core.jit_prepare (re-encode + mapper + assemble, one jit)",
        "cache_prefill_ms": "core.jit_cache_prefill of the prompt over the prepared cache (and view), LoRA on",
        "cache_profile": "--profile only: the cache prefill compiled as one module and traced over 3 calls after the "
                         "timing; self time per XLA op (nested ops subtracted, summed over threads), by kind (dot, "
                         "exp, reduce, copy, gather, dynamic-slice, elementwise, control) and the top ops with the "
                         "JAX operation each comes from (psynth_jax/measure/profile.py)",
        "text_profile": "--profile-text only: as cache_profile, of the text path's prefill (one traced call)",
        "partial": "true while the run is going: ttft.json is rewritten after every point, so a run stopped "
                   "early keeps the points it finished; false once every point is in",
        "view_slots": "view only: worker-row slots the prompt's attention reads, B*K*(P + L) (P masked)",
        "cache_ttft_ms": "prepare + extend + first token (greedy), end to end",
        "text_ttft_ms": "runtime.prefill of K*L + prompt_tokens tokens, LoRA off, + first token (greedy)",
        "speedup": "text_ttft_ms / cache_ttft_ms, same run",
        "first_call_ms": "each function's first call at that point: includes compilation unless an earlier "
                         "point of the same shape compiled it",
        "text_note": "the real text prompt also prefills per-branch headings ('[Sub-agent i]:'); not counted, "
                     "which slightly favours the text path",
        **ROOFLINE_DEFINITIONS,
        **SPREAD_DEFINITIONS,
    }
    if peer is not None:
        definitions.update(peer.get("definitions", {}))
        definitions["peer_first_call_ms"] = "the peer's first call per function at that point (cuBLAS/SDPA warm-up)"
        definitions["peer_times_ms"] = "the peer's timed calls, ms"
        definitions["speedup_vs_best_text"] = ("min(text_ttft_ms, peer_text_ttft_ms) / cache_ttft_ms: the speedup over "
                                               "the faster text path of the run")
    meta = base_metadata("ttft", cfg, arch=arch, hub=hub, dtype=dtype, attn_impl=attn_impl, command=command,
                         repeats=repeats, seed=seed, schema_version=SCHEMA_VERSION, weights_note=WEIGHTS_NOTE)
    return {
        **meta,
        "mapper_kind": mapper_kind,
        "cache_path": cache_path,
        "lora": {"rank": lora_rank, "alpha": 2.0 * lora_rank, "targets": list(LoRAConfig().targets),
                 "cache_path": "on", "text_path": "off"},
        "ks": list(ks),
        "ls": list(ls),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "worker_prompt_tokens": worker_prompt_tokens,
        "new_tokens_room": new_tokens,
        "warmup": warmup,
        "statistic": "median over `repeats` timed calls after one compile call; ms; the calls of every timed "
                     "function alternate per repeat (timing_order)",
        "definitions": definitions,
        "roofline": roofline.to_dict() if roofline is not None else None,
        "peer": peer,
    }
