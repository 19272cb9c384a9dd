"""Batched synthesis: TTFT, output tokens/s and per-request latency for B requests at once.

`psynth bench batch` serves B requests (each with K branches of L tokens and a synthesizer prompt
of `prompt_tokens` tokens) in one batch, for every B of --bs, through both synthesis paths, and
decodes `new_tokens` output tokens per request after the first:

- cache path (METHOD.md section 3): `core.prepare` (re-encode + mapper + assemble) ->
  `core.jit_cache_prefill` of the prompt over the prepared cache, LoRA on -> first token; then
  `runtime.continue_generation` (the jitted token loop of generation) for `new_tokens` tokens.
- text path (METHOD.md section 4): `runtime.prefill` of K*L + prompt tokens, LoRA off -> first
  token; then the same decode loop over the text cache, LoRA off.

Per path and B, three timed functions (each compiled first, then `repeats` timed calls, median):
TTFT (up to the first token), decode (the token loop alone; its input cache is rebuilt outside
the timer because the loop donates it) and latency (the whole request end to end: what one
request waits for when B are served together). Output tokens/s = B * new_tokens / decode time:
the serving throughput of the decode phase, which batching raises until memory bandwidth or
compute saturates. Greedy sampling with no stop token, so every row decodes all `new_tokens`.

Weights, branch KV and tokens are random: the work done does not depend on their values.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import harness
from benchmarks.harness import (Column, Recorder, add_common_arguments, base_metadata, command_line, describe_run,
                                int_list, report, resolve_arch, resolve_dtype, say)
from benchmarks.plots import plot_batch
from benchmarks.ttft import _random_branches
from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.measure.timing import OutOfMemory, time_calls
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.loaded import parse_dtype, random_model
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.mapper import MAPPER_KINDS, make_mapper

PATHS = ("cache", "text")

TABLE_COLUMNS: tuple[Column, ...] = (
    ("B", "batch", "{:>3d}"),
    ("cache TTFT", "cache_ttft_ms", "{:>10.2f}"),
    ("text TTFT", "text_ttft_ms", "{:>10.2f}"),
    ("cache tok/s", "cache_tokens_per_s", "{:>11.1f}"),
    ("text tok/s", "text_tokens_per_s", "{:>10.1f}"),
    ("cache lat", "cache_latency_ms", "{:>9.1f}"),
    ("text lat", "text_latency_ms", "{:>9.1f}"),
    ("TTFT x", "ttft_speedup", "{:>6.2f}x"),
)

DEFINITIONS: dict[str, str] = {
    "batch": "B, requests served together in one call",
    "branch_tokens": "K*L branch tokens per request",
    "{path}_ttft_ms": "cache: core.prepare + extend (LoRA on) + first token; text: prefill of K*L + "
                      "prompt tokens (LoRA off) + first token; median",
    "{path}_decode_ms": "runtime.continue_generation of new_tokens tokens per request after the prefill "
                        "(the first token sampled from the prefill logits, then new_tokens model calls; "
                        "greedy, no stop token), median; the donated input cache is rebuilt outside the timer",
    "{path}_latency_ms": "one request's wall time end to end when B are served together: TTFT work + decode "
                         "loop in one measured call, median",
    "{path}_output_tokens": "B * new_tokens",
    "{path}_tokens_per_s": "B * new_tokens / (decode_ms / 1e3): decode-phase output throughput",
    "{path}_ms_per_token": "decode_ms / new_tokens: time between output tokens (all B rows advance together)",
    "ttft_speedup": "text_ttft_ms / cache_ttft_ms",
    "latency_speedup": "text_latency_ms / cache_latency_ms",
    "first_call_ms": "compile-inclusive first call of each timed function",
    "text_note": "the real text path also prefills per-branch headings ('[Sub-agent i]:'); not counted, "
                 "which slightly favours the text path",
}


def check_batch(cfg: ModelConfig, bs: Sequence[int], k: int, l: int, prompt_tokens: int, new_tokens: int,
                worker_prompt_tokens: int, repeats: int, mapper_kind: str) -> None:
    """Errors naming the impossible setting, before anything is allocated."""
    if not bs:
        raise ValueError("need at least one batch size in --bs")
    bad = [b for b in bs if int(b) < 1]
    if bad:
        raise ValueError(f"batch sizes must be >= 1 (B < 1 is impossible), got {bad}")
    for name, v in (("--k", k), ("--l", l), ("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens),
                    ("--repeats", repeats)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if worker_prompt_tokens < 0:
        raise ValueError(f"--worker-prompt-tokens must be >= 0, got {worker_prompt_tokens}")
    if mapper_kind not in MAPPER_KINDS:
        raise ValueError(f"unknown mapper kind {mapper_kind!r}; choose one of {MAPPER_KINDS}")
    text = k * l + prompt_tokens + new_tokens
    if text > cfg.max_position_embeddings:
        raise ValueError(
            f"the text path needs K*L + prompt + new = {text} positions, over the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}: lower --k/--l/--prompt-tokens/--new-tokens"
        )
    if l + worker_prompt_tokens > cfg.max_position_embeddings:
        raise ValueError(f"worker prompt + branch length = {l + worker_prompt_tokens} exceeds the model's "
                         f"{cfg.max_position_embeddings} positions")


def run_batch_sweep(cfg: ModelConfig, *, bs: Sequence[int], k: int, l: int, prompt_tokens: int = 128,
                    new_tokens: int = 128, dtype: str = "float32", attn_impl: str = "xla", repeats: int = 3,
                    mapper_kind: str = "affine_length", lora_rank: int = 16, worker_prompt_tokens: int = 64,
                    paths: Sequence[str] = PATHS, seed: int = 0, warmup: bool = True,
                    verbose: bool = True) -> list[dict[str, Any]]:
    """Both paths at every B; one row per B (times in ms)."""
    bs = [int(b) for b in bs]
    check_batch(cfg, bs, k, l, prompt_tokens, new_tokens, worker_prompt_tokens, repeats, mapper_kind)
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {list(paths)}")
    model = random_model(cfg, dtype=dtype, lora=LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank), seed=seed)
    mapper_def, mapper_state = nnx.split(make_mapper(mapper_kind, cfg.num_kv_heads, seed=seed))
    key = jax.random.key(seed)

    def measure(i: int, b: int, reps: int) -> dict[str, Any]:
        return measure_batch_point(model.graphdef, model.state, mapper_def, mapper_state, cfg, batch=b, k=k, l=l,
                                   prompt_tokens=prompt_tokens, new_tokens=new_tokens, dtype=dtype,
                                   attn_impl=attn_impl, repeats=reps, worker_prompt_tokens=worker_prompt_tokens,
                                   paths=paths, key=jax.random.fold_in(key, i))

    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        if warmup:  # a process's first executions run slow: one discarded pass over the first B
            if verbose:
                say("batch", f"warm-up pass at B={bs[0]} (discarded)")
            measure(0, bs[0], 1)
            gc.collect()
        for i, b in enumerate(bs):
            if verbose:
                say("batch", f"point {i + 1}/{len(bs)}: B={b} (compiling + timing)")
            rows.append(measure(i, b, repeats))
            gc.collect()
    return rows


def measure_batch_point(gd, st, mapper_def, mapper_state, cfg: ModelConfig, *, batch: int, k: int, l: int,
                        prompt_tokens: int, new_tokens: int, dtype: str, attn_impl: str, repeats: int,
                        worker_prompt_tokens: int, paths: Sequence[str], key: jax.Array) -> dict[str, Any]:
    """One row: TTFT, decode and latency of each path at batch B."""
    kb, kp, kt = jax.random.split(key, 3)
    extra = prompt_tokens + new_tokens
    text_len = k * l + prompt_tokens
    row: dict[str, Any] = {
        "batch": batch, "K": k, "L": l, "branch_tokens": k * l, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "text_tokens": text_len, "worker_prompt_tokens": worker_prompt_tokens,
        "cache_slots": k * l + extra, "text_slots": text_len + new_tokens,
    }
    record = Recorder()
    greedy = SamplingConfig()

    def decode(lora: bool) -> Callable[[tuple[jax.Array, Any]], runtime.Generation]:
        def go(prefilled):
            logits, cache = prefilled
            return runtime.continue_generation(gd, st, logits, cache, jax.random.key(0), max_new_tokens=new_tokens,
                                               sampling=greedy, stop_ids=(), lora=lora, attn_impl=attn_impl)
        return go

    def path_parts(name: str) -> tuple[Callable[[], Any], bool]:
        """(prefill: () -> (last logits, cache), LoRA on?) of one path."""
        if name == "cache":
            shape = (cfg.num_layers, batch, k, l, cfg.num_kv_heads, cfg.head_dim)
            branches = _random_branches(kb, jnp.int32(worker_prompt_tokens), shape=shape, dtype=parse_dtype(dtype))
            prompt = jax.random.randint(kp, (batch, prompt_tokens), 0, cfg.vocab_size, jnp.int32)
            plen = jnp.full((batch,), prompt_tokens, jnp.int32)

            def prefill():
                cache, _ = core.jit_prepare(branches, mapper_def, mapper_state, cfg=cfg, extra_slots=extra)
                return core.jit_cache_prefill(gd, st, prompt, plen, cache, lora=True, attn_impl=attn_impl)
            return prefill, True
        tokens = jax.random.randint(kt, (batch, text_len), 0, cfg.vocab_size, jnp.int32)
        lens = jnp.full((batch,), text_len, jnp.int32)

        def prefill():
            return runtime.prefill(gd, st, tokens, lens, num_slots=text_len + new_tokens, attn_impl=attn_impl)
        return prefill, False

    for name in paths:
        try:
            prefill, lora = path_parts(name)
            dec = decode(lora)
            timed = {
                "ttft": time_calls(lambda: runtime.first_token(prefill()[0], jax.random.key(0), greedy), repeats),
                "decode": time_calls(dec, repeats, setup=prefill),
                "latency": time_calls(lambda: dec(prefill()), repeats),
            }
            for part, t in timed.items():
                row[f"{name}_{part}_ms"] = record.record(f"{name}_{part}", t)
            row[f"{name}_output_tokens"] = batch * new_tokens
            row[f"{name}_tokens_per_s"] = batch * new_tokens / (row[f"{name}_decode_ms"] / 1e3)
            row[f"{name}_ms_per_token"] = row[f"{name}_decode_ms"] / new_tokens
        except OutOfMemory as err:
            row[f"{name}_error"] = f"out of memory: {err}"
        finally:
            prefill = dec = None
            gc.collect()
    if "cache_ttft_ms" in row and "text_ttft_ms" in row:
        row["ttft_speedup"] = row["text_ttft_ms"] / row["cache_ttft_ms"]
        row["latency_speedup"] = row["text_latency_ms"] / row["cache_latency_ms"]
    if any(f"{p}_error" in row for p in paths):
        row["error"] = "; ".join(row[f"{p}_error"] for p in paths if f"{p}_error" in row)
    row.update(record.fields())
    return row


# ------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bs", type=int_list, default="1,8,32", help="batch sizes B (requests per call), comma-separated")
    p.add_argument("--k", type=int, default=4, help="branches K per request")
    p.add_argument("--l", type=int, default=1024, help="tokens L per branch")
    p.add_argument("--prompt-tokens", type=int, default=128, help="synthesizer prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=128, help="output tokens N decoded per request")
    p.add_argument("--paths", default="cache,text", help="synthesis paths to time: cache, text or cache,text")
    p.add_argument("--mapper", default="affine_length", choices=list(MAPPER_KINDS), help="cache mapper kind")
    p.add_argument("--lora-rank", type=int, default=16, help="synthesizer LoRA rank (on in the cache path)")
    p.add_argument("--worker-prompt-tokens", type=int, default=64,
                   help="RoPE offset P of every branch (its worker prompt), undone by the re-encoding")
    p.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up pass over the first B")
    add_common_arguments(p, name="batch")


_OPTIONS = ("arch", "bs", "k", "l", "prompt_tokens", "new_tokens", "paths", "mapper", "lora_rank",
            "worker_prompt_tokens", "dtype", "attn_impl", "repeats", "seed", "out")


def _paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        raise ValueError(f"--paths must list cache and/or text, got {text!r}")
    return paths


def run(args: argparse.Namespace) -> int:
    cfg, arch, hub = resolve_arch(args.arch)
    dtype = resolve_dtype(args.dtype)
    paths = _paths(args.paths)
    check_batch(cfg, args.bs, args.k, args.l, args.prompt_tokens, args.new_tokens, args.worker_prompt_tokens,
                args.repeats, args.mapper)
    meta = base_metadata("batch", cfg, arch=arch, hub=hub, dtype=dtype, attn_impl=args.attn_impl,
                         command=command_line("batch", args, _OPTIONS, ("no_warmup",), arch=arch, dtype=dtype),
                         repeats=args.repeats, seed=args.seed)
    meta.update(
        bs=list(args.bs), K=args.k, L=args.l, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        paths=paths, mapper_kind=args.mapper, worker_prompt_tokens=args.worker_prompt_tokens,
        warmup=not args.no_warmup, sampling="greedy, no stop token (every row decodes new_tokens tokens)",
        lora={"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "targets": list(LoRAConfig().targets),
              "cache_path": "on", "text_path": "off"},
        statistic="median over `repeats` timed calls after one compile call; ms",
        definitions=DEFINITIONS,
    )
    describe_run("batch", arch, cfg, meta, f"K={args.k} x L={args.l}, prompt {args.prompt_tokens}, "
                                           f"{args.new_tokens} new tokens")
    rows = run_batch_sweep(cfg, bs=args.bs, k=args.k, l=args.l, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, dtype=dtype, attn_impl=args.attn_impl, repeats=args.repeats,
                           mapper_kind=args.mapper, lora_rank=args.lora_rank,
                           worker_prompt_tokens=args.worker_prompt_tokens, paths=paths, seed=args.seed,
                           warmup=not args.no_warmup)
    report("batch", meta, rows, TABLE_COLUMNS, args, plot_batch)
    return 0


if __name__ == "__main__":  # python -m benchmarks.batch ... = psynth bench batch ...
    sys.exit(harness.main("batch"))
