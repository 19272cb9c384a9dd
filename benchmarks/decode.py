"""Synthesizer decode over a long cache: time per token against the memory-bandwidth floor.

`psynth bench decode` fills a KV cache of `cache_tokens` tokens per request (random keys/values,
as the assembled branch caches + synthesizer prompt would be after the cache path's prefill) and
times decoding `steps` tokens from it with the synthesizer (LoRA on unless --no-lora), two ways:

- loop: `runtime.continue_generation`, the jitted `lax.while_loop` token loop that generation
  really uses (one dispatch for all `steps` tokens); per-token time = loop time / steps. This is
  the headline number (`step_ms`, `tokens_per_s`).
- host: `runtime.decode_step` called once per token from Python (one dispatch per token), the
  median of `steps` single-step timings (`host_step_ms`): dispatch overhead made visible.

Decoding one token at small batch is memory-bound: every step must read every weight once and
every cached key/value once. Its floor (the best any implementation could do) is

    floor per step = (weight bytes + KV bytes read per step) / memory bandwidth

with the cost model of psynth_jax/measure/roofline.py: weight bytes = every backbone parameter
except the input-embedding table (a gather of B rows; counted when tied, since the LM head then
reads it whole), plus the LoRA A/B when the LoRA is on (`roofline.weight_bytes`); KV bytes =
2 (K and V) x layers x B x kv_tokens x kv_heads x head_dim x itemsize (`roofline.kv_bytes`),
kv_tokens = cache_tokens + (steps + 1) / 2, the mean number of keys a step of the loop attends
to (step i also sees the i tokens it appended and its own). `ratio` = step time / floor: 1.0 is
the roofline. The bandwidth is --bandwidth-gbs, else a roofline.json's (--roofline-json), else
measured now by benchmarks/roofline.py's `measure_bandwidth` (see `bandwidth_gbs`).

Weights, cache contents and tokens are random: shapes, FLOPs and memory traffic do not depend on
their values.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.harness import (Column, Recorder, add_common_arguments, base_metadata, command_line, describe_run,
                                int_list, lora_rank_of, report, resolve_arch, resolve_dtype, say)
from benchmarks.plots import plot_decode
from benchmarks.roofline import measure_bandwidth
from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.measure.roofline import dtype_bytes, kv_bytes, load_roofline, weight_bytes
from psynth_jax.measure.timing import OutOfMemory, Timing, time_calls
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.model.loaded import parse_dtype, random_model
from psynth_jax.model.transformer import LoRAConfig


def bandwidth_gbs(given: float | None, roofline_json: str | None = None) -> tuple[float, str]:
    """(memory bandwidth GB/s, where it came from): --bandwidth-gbs, else a roofline.json's
    (`psynth bench roofline`), else measured now with `measure_bandwidth`."""
    if given is not None:
        if not given > 0:
            raise ValueError(f"--bandwidth-gbs must be positive, got {given}")
        return float(given), "given (--bandwidth-gbs)"
    if roofline_json:
        r = load_roofline(roofline_json)
        return r.bandwidth_gbs, f"roofline.json: {roofline_json} ({r.device_kind})"
    bw = measure_bandwidth()
    return bw["bytes_per_s"] / 1e9, ("measured: benchmarks.roofline.measure_bandwidth (best of in-place x + 1 "
                                     f"and sum(x) over {bw['nbytes'] / 2 ** 20:.0f} MiB float32)")


# =====================================================================================
# decode benchmark
# =====================================================================================
TABLE_COLUMNS: tuple[Column, ...] = (
    ("cache", "cache_tokens", "{:>7d}"),
    ("B", "batch", "{:>3d}"),
    ("steps", "steps", "{:>5d}"),
    ("MB/step", "bytes_per_step_mb", "{:>9.1f}"),
    ("floor ms", "floor_ms", "{:>9.3f}"),
    ("step ms", "step_ms", "{:>8.3f}"),
    ("host ms", "host_step_ms", "{:>8.3f}"),
    ("tok/s", "tokens_per_s", "{:>9.1f}"),
    ("GB/s", "achieved_gbs", "{:>7.1f}"),
    ("step/floor", "ratio", "{:>9.2f}x"),
)

DEFINITIONS: dict[str, str] = {
    "cache_tokens": "tokens already in the cache per request before decoding (valid slots)",
    "slots": "cache slots allocated per request: cache_tokens + steps + 1",
    "kv_tokens_read": "mean keys a decode step attends to: cache_tokens + (steps + 1) / 2",
    "weight_bytes": "bytes of weights read per step (roofline.weight_bytes): every backbone parameter except the "
                    "input embedding table (counted when tied) + the LoRA A/B when lora is on, at `dtype`'s itemsize "
                    "(the adapters are float32: their extra bytes are < 0.5% of the total)",
    "kv_bytes_read": "roofline.kv_bytes: 2 (K, V) x layers x batch x kv_tokens_read x kv_heads x head_dim x itemsize",
    "bytes_per_step": "weight_bytes + kv_bytes_read",
    "floor_ms": "bytes_per_step / bandwidth: the memory-bandwidth floor of one decode step",
    "loop_ms": "runtime.continue_generation for `steps` tokens (jitted while_loop, greedy, no stop token), median",
    "step_ms": "loop_ms / steps: time per decoded token (all batch rows)",
    "tokens_per_s": "batch * steps / (loop_ms / 1e3) = batch / step time",
    "ratio": "step_ms / floor_ms (1.0 = at the bandwidth floor)",
    "achieved_gbs": "bytes_per_step / step time / 1e9",
    "host_step_ms": "median of `steps` single runtime.decode_step calls dispatched from Python (one per token)",
    "host_ratio": "host_step_ms / floor_ms",
    "first_call_ms": "compile-inclusive first call of each timed function",
}


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "tokens", "slots", "dtype"))
def random_cache(key: jax.Array, *, cfg: ModelConfig, batch: int, tokens: int, slots: int, dtype: Any) -> KVCache:
    """A KVCache of `slots` slots per row whose first `tokens` hold random keys/values (valid)."""
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    kk, kv = jax.random.split(key)
    valid = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32)[None, :] < tokens, (batch, slots))
    n = jnp.full((batch,), tokens, jnp.int32)
    return KVCache(k=jax.random.normal(kk, shape, dtype), v=jax.random.normal(kv, shape, dtype), valid=valid,
                   end=n, next_pos=n)


def check_decode(cfg: ModelConfig, cache_tokens: Sequence[int], batch: int, steps: int, repeats: int) -> None:
    """Errors naming the impossible setting, before anything is allocated."""
    if not cache_tokens:
        raise ValueError("need at least one --cache-tokens value")
    bad = [c for c in cache_tokens if int(c) < 1]
    if bad:
        raise ValueError(f"--cache-tokens must be positive, got {bad}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    longest = max(cache_tokens) + steps + 1
    if longest > cfg.max_position_embeddings:
        raise ValueError(
            f"cache_tokens + steps + 1 = {longest} positions exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}: lower --cache-tokens or --steps"
        )


def measure_decode_point(gd, st, cfg: ModelConfig, *, cache_tokens: int, batch: int, steps: int, dtype: str,
                         attn_impl: str, lora: LoRAConfig | None, repeats: int, bandwidth: float,
                         key: jax.Array) -> dict[str, Any]:
    """One row: loop and host-step timings over a cache of `cache_tokens` tokens, and the floor."""
    slots = cache_tokens + steps + 1
    use_lora = lora is not None
    kv_tokens = cache_tokens + (steps + 1) / 2
    nbytes = dtype_bytes(dtype)
    wb = weight_bytes(cfg, nbytes, lora_rank=lora_rank_of(lora), lora_targets=lora.targets if lora else ())
    kvb = kv_bytes(cfg, kv_tokens, nbytes, batch=batch)
    floor_s = (wb + kvb) / (bandwidth * 1e9)
    row: dict[str, Any] = {
        "cache_tokens": cache_tokens, "batch": batch, "steps": steps, "slots": slots, "lora": use_lora,
        "kv_tokens_read": kv_tokens, "weight_bytes": wb, "kv_bytes_read": kvb, "bytes_per_step": wb + kvb,
        "bytes_per_step_mb": (wb + kvb) / 1e6, "bandwidth_gbs": bandwidth, "floor_ms": 1e3 * floor_s,
    }
    cache_dtype = parse_dtype(dtype)
    kc, kl = jax.random.split(key)
    logits = jax.random.normal(kl, (batch, cfg.vocab_size), jnp.float32)

    def fresh_cache() -> KVCache:
        return random_cache(kc, cfg=cfg, batch=batch, tokens=cache_tokens, slots=slots, dtype=cache_dtype)

    def loop(cache: KVCache):
        return runtime.continue_generation(gd, st, logits, cache, jax.random.key(0), max_new_tokens=steps,
                                           sampling=SamplingConfig(), stop_ids=(), lora=use_lora, attn_impl=attn_impl)

    record = Recorder()
    try:
        t = time_calls(loop, repeats, setup=fresh_cache)
        row["loop_ms"] = record.record("loop", t)
        row["step_ms"] = t.median_ms / steps
        row["tokens_per_s"] = batch * steps / (t.median_ms / 1e3)
        row["ratio"] = row["step_ms"] / row["floor_ms"]
        row["achieved_gbs"] = (wb + kvb) / (row["step_ms"] / 1e3) / 1e9
        gc.collect()
        h = time_host_steps(gd, st, fresh_cache(), steps, lora=use_lora, attn_impl=attn_impl)
        row["host_step_ms"] = record.record("host_step", h)
        row["host_ratio"] = h.median_ms / row["floor_ms"]
    except OutOfMemory as err:
        row["error"] = f"out of memory: {err}"
    row.update(record.fields())
    return row


def time_host_steps(gd, st, cache: KVCache, steps: int, *, lora: bool, attn_impl: str) -> Timing:
    """One compile call, then `steps` single decode steps, each timed until ready (cache chained)."""
    tokens = jnp.zeros((cache.batch,), jnp.int32)
    state = {"cache": cache}

    def step() -> tuple[jax.Array, KVCache]:
        logits, state["cache"] = runtime.decode_step(gd, st, tokens, state["cache"], lora=lora, attn_impl=attn_impl)
        return logits, state["cache"]

    return time_calls(step, steps)


def run_decode(cfg: ModelConfig, *, cache_tokens: Sequence[int], batch: int = 1, steps: int = 64,
               dtype: str = "float32", attn_impl: str = "xla", lora_rank: int = 16, use_lora: bool = True,
               repeats: int = 3, bandwidth: float, seed: int = 0, verbose: bool = True) -> list[dict[str, Any]]:
    """Time decoding over every cache size; one row per size."""
    cache_tokens = [int(c) for c in cache_tokens]
    check_decode(cfg, cache_tokens, batch, steps, repeats)
    lora = LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank) if use_lora else None
    model = random_model(cfg, dtype=dtype, lora=lora, seed=seed)
    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for i, c in enumerate(cache_tokens):
            if verbose:
                say("decode", f"point {i + 1}/{len(cache_tokens)}: cache {c} tokens, batch {batch} "
                              "(compiling + timing)")
            rows.append(measure_decode_point(
                model.graphdef, model.state, cfg, cache_tokens=c, batch=batch, steps=steps, dtype=dtype,
                attn_impl=attn_impl, lora=lora, repeats=repeats, bandwidth=bandwidth,
                key=jax.random.fold_in(jax.random.key(seed), i)))
            gc.collect()
    return rows


# ------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-tokens", type=int_list, default="16384",
                   help="tokens already cached per request (branch caches + prompt), comma-separated")
    p.add_argument("--batch", type=int, default=1, help="requests decoded together")
    p.add_argument("--steps", type=int, default=64, help="tokens decoded per timed call")
    p.add_argument("--lora-rank", type=int, default=16, help="synthesizer LoRA rank")
    p.add_argument("--no-lora", action="store_true", help="decode with the LoRA off (plain backbone)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="device memory bandwidth for the floor, GB/s; default: from --roofline-json, else measured")
    p.add_argument("--roofline-json", default=None, metavar="PATH",
                   help="reuse the bandwidth of a `psynth bench roofline` roofline.json instead of measuring it")
    add_common_arguments(p, name="decode")


_OPTIONS = ("arch", "cache_tokens", "batch", "steps", "lora_rank", "bandwidth_gbs", "roofline_json", "dtype",
            "attn_impl", "repeats", "seed", "out")


def run(args: argparse.Namespace) -> int:
    cfg, arch, hub = resolve_arch(args.arch)
    dtype = resolve_dtype(args.dtype)
    check_decode(cfg, args.cache_tokens, args.batch, args.steps, args.repeats)
    bw, bw_source = bandwidth_gbs(args.bandwidth_gbs, args.roofline_json)
    meta = base_metadata("decode", cfg, arch=arch, hub=hub, dtype=dtype, attn_impl=args.attn_impl,
                         command=command_line("decode", args, _OPTIONS, ("no_lora",), arch=arch, dtype=dtype),
                         repeats=args.repeats, seed=args.seed)
    use_lora = not args.no_lora
    meta.update(cache_tokens=list(args.cache_tokens), batch=args.batch, steps=args.steps,
                lora={"on": use_lora, "rank": args.lora_rank, "alpha": 2.0 * args.lora_rank,
                      "targets": list(LoRAConfig().targets)},
                bandwidth_gbs=bw, bandwidth_source=bw_source,
                statistic="median over `repeats` timed calls after one compile call; ms",
                definitions=DEFINITIONS)
    describe_run("decode", arch, cfg, meta, f"LoRA {'on' if use_lora else 'off'}, bandwidth {bw:.1f} GB/s "
                                            f"({bw_source.split(':')[0]})")
    rows = run_decode(cfg, cache_tokens=args.cache_tokens, batch=args.batch, steps=args.steps, dtype=dtype,
                      attn_impl=args.attn_impl, lora_rank=args.lora_rank, use_lora=use_lora, repeats=args.repeats,
                      bandwidth=bw, seed=args.seed)
    report("decode", meta, rows, TABLE_COLUMNS, args, plot_decode)
    return 0


if __name__ == "__main__":  # python -m benchmarks.decode ... = psynth bench decode ...
    sys.exit(harness.main("decode"))
