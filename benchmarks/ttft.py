"""Time-to-first-token sweep: text-concatenation path vs cache path, over K branches x L tokens.

For each point (K, L) both synthesis paths are timed in the same run, on the same backbone:

- cache path (METHOD.md section 3), `cache_path="view"` (synthesis/core.py's zero-copy path;
  the default with XLA attention, the only kernel that reads a view): the branches sit in worker
  rows [P prompt slots | L kept slots] as the workers left them; `core.jit_prepare` of the view
  (the mapper's per-(layer, branch) scalars and the synthesizer's empty cache) ->
  `core.jit_cache_prefill` of the prompt attending to the rows in place, LoRA on -> first sampled
  token. `cache_path="materialised"` (the reference): the kept K/V already copied out
  (BranchCaches), `core.jit_prepare` (RoPE re-encoding + mapper + assembly, one jit) -> the
  prefill over the prepared cache; there the re-encoding + assembly without the mapper and the
  mapper alone are timed too. Both: the preparation alone and the prompt prefill alone.
- text path (METHOD.md section 4): `runtime.prefill` of K*L branch tokens + the prompt, LoRA off
  -> first sampled token.

Worker generation is excluded from both, as in the paper. Weights, branch KV and tokens are
random: the work done (shapes, FLOPs, memory traffic) does not depend on their values, so the
timings are those of the real model of that shape. Every timed function runs once to compile
(that first call is recorded as `first_call_ms`), then `repeats` rounds of one call each, in the
order of `ROUND` (the PyTorch peer's text and cache calls, when it runs interleaved, just before
JAX's), so a slow spell of a shared host lands on every side of a ratio; the median is reported,
and each ratio per round with its range (ttft_report.spread_fields). Inputs a timed call consumes
(the donated cache of `extend`) are rebuilt outside the timer.

With a measured `Roofline` (benchmarks/roofline.py) every row also gets each path's floor,
max(bytes / bandwidth, FLOPs / matmul peak) from the analytic cost model of
psynth_jax/measure/roofline.py (`roofline_fields`), the measured/floor ratios and the text path's
MFU; with the PyTorch peer (benchmarks/peer.py, alternated with the sweep's calls, or measured
before it) the transformers + SDPA times of both paths and the JAX/peer ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import harness
from benchmarks.harness import (Recorder, add_common_arguments, command_line, int_list, resolve_arch, resolve_dtype,
                                say, write_json)
from benchmarks.roofline import format_roofline, measure_roofline
from benchmarks.plots import plot_ttft, plot_ttft_floor
from benchmarks.ttft_report import (CACHE_PATHS, PATHS, format_header, format_row, peer_ratios, roofline_fields,
                                    spread_fields, sweep_metadata, table_columns)
from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.measure.profile import profile_jit
from psynth_jax.measure.roofline import Roofline, load_roofline
from psynth_jax.measure.timing import OutOfMemory, Timing, time_once
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import BranchCaches, BranchView, KVCache
from psynth_jax.model.loaded import parse_dtype, random_model
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.branches import assemble, reencode
from psynth_jax.synthesis.mapper import MAPPER_KINDS, make_mapper, map_caches

if TYPE_CHECKING:
    from benchmarks.peer import PeerProcess


@functools.partial(jax.jit, static_argnames=("cfg", "extra_slots"))
def _reencode_assemble(branches: BranchCaches, *, cfg: ModelConfig, extra_slots: int):
    """The cache preparation without the mapper (RoPE shift + packing)."""
    return assemble(reencode(branches, cfg), extra_slots)


@functools.partial(jax.jit, static_argnames=("mapper_def",))
def _mapper_only(branches: BranchCaches, mapper_def: nnx.GraphDef, mapper_state: nnx.State):
    """The cache mapper alone, on branch keys/values."""
    return map_caches(nnx.merge(mapper_def, mapper_state), branches.k, branches.v, branches.lengths)


def _random_worker_view(key: jax.Array, prompt_tokens: int, k: int, *, shape: tuple[int, ...], dtype: Any
                       ) -> BranchView:
    """A BranchView of random worker rows [layers, B*K, P + L, Hkv, D]: each row's last L slots
    kept (the output), re-encoded by -P; identity mapper until prepared."""
    kk, kv = jax.random.split(key)
    rows, width = shape[1], shape[2]
    cache = KVCache(k=jax.random.normal(kk, shape, dtype), v=jax.random.normal(kv, shape, dtype),
                    valid=jnp.ones((rows, width), bool), end=jnp.full((rows,), width, jnp.int32),
                    next_pos=jnp.full((rows,), width, jnp.int32))
    p = jnp.full((rows,), prompt_tokens, jnp.int32)
    return core.view(cache, p, jnp.full((rows,), width - prompt_tokens, jnp.int32), p, num_requests=rows // k)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _random_branches(key: jax.Array, offset: jax.Array, *, shape: tuple[int, ...], dtype: Any) -> BranchCaches:
    """Random BranchCaches [layers, B, K, L, Hkv, D]; every branch full (length L) at RoPE offset."""
    kk, kv = jax.random.split(key)
    _, b, k, l = shape[:4]
    return BranchCaches(
        k=jax.random.normal(kk, shape, dtype),
        v=jax.random.normal(kv, shape, dtype),
        lengths=jnp.full((b, k), l, jnp.int32),
        offsets=jnp.full((b, k), offset, jnp.int32),
    )


def _check_sweep(cfg: ModelConfig, ks: Sequence[int], ls: Sequence[int], prompt_tokens: int, batch: int,
                 new_tokens: int, worker_prompt_tokens: int, mapper_kind: str, cache_path: str = "view",
                 attn_impl: str = "xla") -> None:
    if cache_path not in CACHE_PATHS:
        raise ValueError(f"unknown cache path {cache_path!r}; choose one of {CACHE_PATHS}")
    if cache_path == "view" and attn_impl != "xla":
        raise ValueError(f"the zero-copy cache path (view) needs attn_impl='xla', got {attn_impl!r}")
    if not ks or not ls:
        raise ValueError("need at least one K and one L")
    bad = [x for x in list(ks) + list(ls) if int(x) <= 0]
    if bad:
        raise ValueError(f"K and L must be positive integers, got {bad}")
    if prompt_tokens <= 0 or batch <= 0 or new_tokens < 0 or worker_prompt_tokens < 0:
        raise ValueError("prompt_tokens and batch must be positive; new_tokens, worker_prompt_tokens >= 0")
    if mapper_kind not in MAPPER_KINDS:
        raise ValueError(f"unknown mapper kind {mapper_kind!r}; choose one of {MAPPER_KINDS}")
    longest = max(ks) * max(ls) + prompt_tokens + new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(
            f"the longest text-path prompt (K*L + prompt + new = {longest} tokens) exceeds the model's "
            f"{cfg.max_position_embeddings} positions: lower --ks/--ls"
        )
    if max(ls) + worker_prompt_tokens > cfg.max_position_embeddings:
        raise ValueError("worker prompt + branch length exceeds the model's positions")


def run_ttft_sweep(
    cfg: ModelConfig,
    *,
    ks: Sequence[int],
    ls: Sequence[int],
    prompt_tokens: int = 128,
    batch: int = 1,
    dtype: str = "float32",
    attn_impl: str = "xla",
    repeats: int = 3,
    mapper_kind: str = "affine_length",
    lora_rank: int = 16,
    worker_prompt_tokens: int = 64,
    new_tokens: int = 64,
    seed: int = 0,
    warmup: bool = True,
    verbose: bool = True,
    roofline: Roofline | None = None,
    peer_rows: Sequence[dict[str, Any]] | None = None,
    cache_path: str = "auto",
    profile_dir: str | Path | None = None,
    peer: PeerProcess | None = None,
    profile_paths: Sequence[str] = ("cache",),
    on_row: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Time both synthesis paths at every (K, L); one row (a dict, times in ms) per point.

    prompt_tokens: the synthesizer's own prompt (live tokens of the cache path; appended after
    the K*L branch tokens in the text path). worker_prompt_tokens: the RoPE offset P of every
    branch, so the re-encoding really rotates. new_tokens: decode room left in both caches (the
    slot count changes attention cost, so both paths get the same room). The backbone has a
    LoRA of rank `lora_rank` attached (on for the cache path, off for the text path).
    warmup: measure the first point once more before the sweep and discard it.
    roofline: adds the cost-model floors, floor ratios and text MFU to every row.
    peer_rows: rows of a PyTorch peer sweep (benchmarks.peer, same points) run before, merged by (K, L).
    peer: a PeerProcess instead: its calls alternate with JAX's at every point and repeat (ROUND).
    cache_path: "view" (zero-copy) or "materialised" (the reference), see the module docstring;
    "auto": view with XLA attention, materialised with the fused kernels (`resolve_cache_path`).
    profile_dir: also profile the cache prefill at every point (measure/profile.py: self time per
    XLA op, by kind), after its timing: a Perfetto trace in profile_dir/K{k}_L{l}/, the summary
    in the row's `cache_profile`. profile_paths: which paths profile_dir profiles: "cache" and/or
    "text" (the text prefill, one traced call: profile_dir/text_K{k}_L{l}/, `text_profile`).
    on_row: called with the rows so far after every point (a long run on a shared machine keeps
    the points it finished when it is stopped).
    """
    ks, ls = [int(k) for k in ks], [int(l) for l in ls]
    cache_path = resolve_cache_path(cache_path, attn_impl)
    _check_sweep(cfg, ks, ls, prompt_tokens, batch, new_tokens, worker_prompt_tokens, mapper_kind, cache_path,
                 attn_impl)
    say = (lambda *a, **k: print(*a, **k, flush=True)) if verbose else (lambda *a, **k: None)

    model = random_model(cfg, dtype=dtype, lora=LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank), seed=seed)
    gd, st = model.graphdef, model.state
    mapper_def, mapper_state = nnx.split(make_mapper(mapper_kind, cfg.num_kv_heads, seed=seed))
    cache_dtype = parse_dtype(dtype)
    sampling = SamplingConfig()  # greedy: the first token is an argmax
    key = jax.random.key(seed)

    points = [(k, l) for k in ks for l in ls]

    def measure(i: int, k: int, l: int, reps: int, profile: bool = True) -> dict[str, Any]:
        return _measure_point(
            gd, st, mapper_def, mapper_state, cfg, k, l, prompt_tokens=prompt_tokens, batch=batch,
            cache_dtype=cache_dtype, attn_impl=attn_impl, repeats=reps, sampling=sampling,
            worker_prompt_tokens=worker_prompt_tokens, new_tokens=new_tokens, key=jax.random.fold_in(key, i),
            cache_path=cache_path, profile_dir=Path(profile_dir) if profile and profile_dir is not None else None,
            peer=peer, profile_paths=tuple(profile_paths),
        )

    peers = {(int(r["K"]), int(r["L"])): r for r in (peer_rows or ())}
    columns = table_columns(roofline is not None, bool(peers) or peer is not None)
    lora_targets = LoRAConfig().targets

    def finish(row: dict[str, Any]) -> dict[str, Any]:
        before = peers.get((row["K"], row["L"]))
        if before is not None:
            row.update({k: v for k, v in before.items() if k not in ("K", "L")})
        row.update(peer_ratios(row))
        row.update(roofline_fields(row, cfg, roofline, dtype=dtype, lora_rank=lora_rank, lora_targets=lora_targets))
        row.update(spread_fields(row))
        return row

    rows = []
    with warnings.catch_warnings():
        # donation is a no-op on some backends; its warning would only clutter the table
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        if warmup:  # a process's first executions run slow (allocator, thread pools): discard one pass
            if verbose:
                say("ttft", "warm-up pass on the first point (discarded)")
            warm_first = measure(0, *points[0], 1, profile=False)["first_call_ms"]
            gc.collect()
        say(format_header(columns))
        for i, (k, l) in enumerate(points):
            if verbose:
                say("ttft", f"point {i + 1}/{len(points)}: K={k} L={l} (compiling + timing)")
            row = measure(i, k, l, repeats)
            if warmup and i == 0:  # keep the compile-inclusive first calls of the warm-up pass
                row["first_call_ms"] = warm_first
            rows.append(finish(row))
            if on_row is not None:
                on_row(rows)
            say(format_row(row, columns))
            gc.collect()  # drop this point's caches before the next one allocates
    return rows


# the order of one round of timed calls at a point: each peer call just before its JAX counterpart
ROUND = ("peer_text_ttft", "text_ttft", "peer_cache_ttft", "cache_ttft", "cache_prepare", "cache_prefill",
         "cache_reencode_assemble", "cache_mapper")


def _path_of(label: str) -> str:
    """The path a timed function belongs to ("peer_text", "peer_cache", "cache", "text"): its OOM key."""
    return next(p for p in PATHS if label.startswith(p + "_"))


def _measure_point(gd, st, mapper_def, mapper_state, cfg: ModelConfig, k: int, l: int, *, prompt_tokens: int,
                   batch: int, cache_dtype, attn_impl: str, repeats: int, sampling: SamplingConfig,
                   worker_prompt_tokens: int, new_tokens: int, key: jax.Array, cache_path: str = "view",
                   profile_dir: Path | None = None, peer: PeerProcess | None = None,
                   profile_paths: tuple[str, ...] = ("cache",)) -> dict[str, Any]:
    """Build both paths' inputs (and the peer's, in its process), call every timed function once
    (compile), then `repeats` rounds of one call each in the order of ROUND; a path that runs out
    of memory is recorded as `<path>_error` and dropped from the rounds. The labels, in the order
    they were timed, are kept as `timing_order`."""
    kb, kp, kt = jax.random.split(key, 3)
    extra = prompt_tokens + new_tokens  # synthesizer slots after the branch region
    text_len = k * l + prompt_tokens
    row: dict[str, Any] = {
        "K": k, "L": l, "batch": batch, "prompt_tokens": prompt_tokens, "branch_tokens": k * l,
        "text_tokens": text_len, "worker_prompt_tokens": worker_prompt_tokens,
        "cache_slots": k * l + extra, "text_slots": text_len + new_tokens,
    }
    calls: dict[str, Any] = {}  # label -> a function of no argument: one timed call, seconds
    if peer is not None:
        row.update({f"{path}_error": msg for path, msg in peer.point(k, l).items()})
        for path in ("peer_text", "peer_cache"):
            calls[f"{path}_ttft"] = functools.partial(peer.time, path)
    # ------------------------------------------------------------ cache path
    prepared_inputs: dict[str, Any] = {}
    try:
        prompt = jax.random.randint(kp, (batch, prompt_tokens), 0, cfg.vocab_size, jnp.int32)
        prompt_len = jnp.full((batch,), prompt_tokens, jnp.int32)
        if cache_path == "view":
            rows_shape = (cfg.num_layers, batch * k, worker_prompt_tokens + l, cfg.num_kv_heads, cfg.head_dim)
            branches = jax.block_until_ready(
                _random_worker_view(kb, worker_prompt_tokens, k, shape=rows_shape, dtype=cache_dtype))
            row["view_slots"] = batch * k * (worker_prompt_tokens + l)
        else:
            shape = (cfg.num_layers, batch, k, l, cfg.num_kv_heads, cfg.head_dim)
            branches = jax.block_until_ready(
                _random_branches(kb, jnp.int32(worker_prompt_tokens), shape=shape, dtype=cache_dtype))
            calls["cache_reencode_assemble"] = lambda: time_once(
                lambda: _reencode_assemble(branches, cfg=cfg, extra_slots=extra))
            calls["cache_mapper"] = lambda: time_once(lambda: _mapper_only(branches, mapper_def, mapper_state))
        prepared_inputs.update(branches=branches, prompt=prompt, prompt_len=prompt_len)

        def prepare():  # -> (the synthesizer's starting cache, the mapped view or None)
            return core.jit_prepare(branches, mapper_def, mapper_state, cfg=cfg, extra_slots=extra)

        def prefill(prepared):
            cache, view = prepared
            return core.jit_cache_prefill(gd, st, prompt, prompt_len, cache, lora=True, attn_impl=attn_impl,
                                          view=view)[0]

        def cache_ttft():
            return runtime.first_token(prefill(prepare()), jax.random.key(0), sampling)

        calls["cache_ttft"] = lambda: time_once(cache_ttft)
        calls["cache_prepare"] = lambda: time_once(prepare)
        calls["cache_prefill"] = lambda: time_once(prefill, setup=prepare)
    except OutOfMemory as err:
        row["cache_error"] = f"out of memory: {err}"
    # ------------------------------------------------------------- text path
    try:
        tokens = jax.random.randint(kt, (batch, text_len), 0, cfg.vocab_size, jnp.int32)
        lengths = jnp.full((batch,), text_len, jnp.int32)
        slots = text_len + new_tokens

        def text_ttft():
            logits, _ = runtime.prefill(gd, st, tokens, lengths, num_slots=slots, attn_impl=attn_impl)
            return runtime.first_token(logits, jax.random.key(0), sampling)

        calls["text_ttft"] = lambda: time_once(text_ttft)
    except OutOfMemory as err:
        row["text_error"] = f"out of memory: {err}"

    first, times, order = _rounds(calls, repeats, row)
    jax_rec, peer_rec = Recorder(), Recorder()
    for label in (x for x in ROUND if x in times):
        rec = peer_rec if label.startswith("peer_") else jax_rec
        row[f"{label}_ms"] = rec.record(label, Timing(first[label], times[label]))
        if label in ("cache_ttft", "text_ttft"):
            row[f"{label[:-5]}_ttft_min_ms"] = 1e3 * min(times[label])
    row["timing_order"] = order
    if "cache_ttft_ms" in row and "text_ttft_ms" in row:
        row["speedup"] = row["text_ttft_ms"] / row["cache_ttft_ms"]
    row.update(jax_rec.fields())
    if peer is not None:
        row["peer_first_call_ms"], row["peer_times_ms"] = peer_rec.first, peer_rec.times
    if profile_dir is not None and "cache" in profile_paths and "cache_error" not in row:
        branches, prompt, prompt_len = (prepared_inputs[n] for n in ("branches", "prompt", "prompt_len"))

        def cache_prefill(state, cache, view):  # one module (nested jits inline): the profiled call
            return core.jit_cache_prefill(gd, state, prompt, prompt_len, cache, lora=True, attn_impl=attn_impl,
                                          view=view)[0]

        prof = profile_jit(cache_prefill, lambda: (st, *core.jit_prepare(branches, mapper_def, mapper_state, cfg=cfg,
                                                                         extra_slots=extra)), profile_dir / f"K{k}_L{l}")
        row["cache_profile"] = prof.summary()
        say("ttft", f"K={k} L={l} cache prefill profile:\n{prof.format()}")
    if profile_dir is not None and "text" in profile_paths and "text_error" not in row:
        def text_prefill(state, tokens, lengths):  # the text path's prefill as one module
            return runtime.prefill(gd, state, tokens, lengths, num_slots=slots, attn_impl=attn_impl)[0]

        prof = profile_jit(text_prefill, lambda: (st, tokens, lengths), profile_dir / f"text_K{k}_L{l}", calls=1)
        row["text_profile"] = prof.summary()
        say("ttft", f"K={k} L={l} text prefill profile:\n{prof.format()}")
    return row


def _rounds(calls: dict[str, Any], repeats: int, row: dict[str, Any]
            ) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """Round 0 calls each function once (its compile call); rounds 1..repeats time one call each,
    in ROUND's order. -> (first call s, timed calls s, the labels of the timed calls in order).
    A call that runs out of memory records `<path>_error` in `row` and drops the path."""
    live = [x for x in ROUND if x in calls and f"{_path_of(x)}_error" not in row]
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    order: list[str] = []
    for rnd in range(max(int(repeats), 1) + 1):
        for label in list(live):
            if label not in live:  # its path ran out of memory earlier in this round
                continue
            try:
                t = calls[label]()
            except OutOfMemory as err:
                path = _path_of(label)
                row[f"{path}_error"] = str(err) if str(err).startswith("out of memory") else f"out of memory: {err}"
                live = [x for x in live if _path_of(x) != path]
                continue
            if rnd == 0:
                first[label] = t
            else:
                times.setdefault(label, []).append(t)
                order.append(label)
    for label in list(times):  # a path dropped mid-way keeps no partial times
        if f"{_path_of(label)}_error" in row:
            del times[label]
    return first, times, order


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `psynth bench ttft` options."""
    p.add_argument("--ks", type=int_list, default="1,2,4", help="branch counts K, comma-separated")
    p.add_argument("--ls", type=int_list, default="32,64,128", help="tokens per branch L, comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=32, help="synthesizer prompt tokens (live in both paths)")
    p.add_argument("--batch", type=int, default=1, help="requests per call")
    p.add_argument("--mapper", default="affine_length", choices=["affine_length", "per_head_affine"],
                   help="cache mapper kind")
    p.add_argument("--max-positions", type=int, default=None, metavar="N",
                   help="raise the architecture's position limit to N (weights are random, so positions past "
                        "the trained length cost the same; e.g. 8 x 1024 branch tokens + a prompt at SmolLM2's 8192)")
    p.add_argument("--cache-path", default="auto", choices=["auto", *CACHE_PATHS],
                   help="view: the zero-copy cache path (attention reads the worker rows in place; --attn-impl xla "
                        "only); materialised: branch K/V copied, re-encoded, mapped and packed first (the reference); "
                        "auto: view with xla attention, materialised with the fused kernels")
    p.add_argument("--lora-rank", type=int, default=16, help="synthesizer LoRA rank (on in the cache path)")
    p.add_argument("--worker-prompt-tokens", type=int, default=64,
                   help="RoPE offset P of every branch (its worker prompt), undone by the re-encoding")
    p.add_argument("--new-tokens", type=int, default=64, help="decode room left in both paths' caches")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the discarded warm-up pass over the first point")
    roof = p.add_mutually_exclusive_group()
    roof.add_argument("--no-roofline", action="store_true",
                      help="skip the roofline measurement (no floor / MFU fields)")
    roof.add_argument("--roofline-json", default=None, metavar="PATH",
                      help="reuse a measured roofline (a roofline.json of `psynth bench roofline`, or a ttft.json) "
                           "instead of measuring it before the sweep")
    p.add_argument("--profile", action="store_true",
                   help="also profile the cache prefill at every point after timing it: self time per XLA op and "
                        "per kind (dot, exp, copy, ...) in each row's cache_profile, Perfetto traces in OUT/profile/")
    p.add_argument("--profile-text", action="store_true",
                   help="also profile the text path's prefill at every point (one traced call): each row's "
                        "text_profile, traces in OUT/profile/text_K{k}_L{l}/ (the view of where the text path loses)")
    p.add_argument("--torch-peer", action="store_true",
                   help="also time the same architecture in PyTorch + transformers (SDPA): text prefill and prompt "
                        "over pre-built branch caches, in a child process (see --peer-order)")
    p.add_argument("--peer-order", default="interleaved", choices=["interleaved", "first"],
                   help="interleaved: the peer's calls alternate with JAX's per point and per repeat (peer text, JAX "
                        "text, peer cache, JAX cache, ...), so a slow spell of a shared host hits both sides; first: "
                        "every peer point before JAX starts (on a GPU: JAX preallocates most of its memory)")
    add_common_arguments(p, name="ttft")


_OPTIONS = ("arch", "ks", "ls", "prompt_tokens", "batch", "dtype", "attn_impl", "mapper", "cache_path", "max_positions",
            "lora_rank", "worker_prompt_tokens", "new_tokens", "repeats", "seed", "out", "roofline_json", "peer_order")
_SWITCHES = ("no_warmup", "no_roofline", "torch_peer", "profile", "profile_text")


def resolve_cache_path(cache_path: str, attn_impl: str) -> str:
    """"auto" -> "view" with XLA attention (the only kernel that reads a view), else "materialised"."""
    if cache_path != "auto":
        return cache_path
    return "view" if attn_impl == "xla" else "materialised"


def run(args: argparse.Namespace) -> int:
    """Order: (1) with `--peer-order first`, the PyTorch peer's every point, in a child process,
    before this process starts JAX's backend (JAX reserves most GPU memory when it starts); with
    `interleaved` (the default), the peer's child process starts and waits for requests; (2) the
    roofline; (3) the JAX sweep, which alternates its calls with the peer's (or merges the peer's
    rows) and derives the floor fields and the ratios' spreads; (4) JSON, table, plot."""
    cfg, arch, hub = resolve_arch(args.arch)
    if args.max_positions:
        if args.max_positions <= 0:
            raise ValueError(f"--max-positions must be positive, got {args.max_positions}")
        cfg = dataclasses.replace(cfg, max_position_embeddings=args.max_positions)
    out = Path(args.out)
    if not args.torch_peer or args.peer_order == "first":
        return _run(args, cfg, arch, hub, out, None)
    from benchmarks.peer import PeerProcess  # torch: only in its child, only when asked for

    say("ttft", "PyTorch peer in a child process, its calls alternated with JAX's")
    with PeerProcess(cfg, dtype=args.dtype, seed=args.seed, prompt_tokens=args.prompt_tokens, batch=args.batch,
                     spec_dir=out) as server:
        return _run(args, cfg, arch, hub, out, server)


def _run(args: argparse.Namespace, cfg: ModelConfig, arch: str, hub: str | None, out: Path,
         server: PeerProcess | None) -> int:
    peer = None
    if args.torch_peer and server is None:
        from benchmarks.peer import require_torch, run_peer_subprocess  # torch: only when asked for

        require_torch()
        say("ttft", "PyTorch peer first, in a child process (frees its memory before JAX starts)")
        peer = run_peer_subprocess(
            cfg, out / "ttft_peer.json", ks=args.ks, ls=args.ls, prompt_tokens=args.prompt_tokens, batch=args.batch,
            dtype=args.dtype, repeats=args.repeats, seed=args.seed, warmup=not args.no_warmup)
    elif server is not None:
        peer = {"metadata": server.metadata, "rows": None}
    dtype = resolve_dtype(args.dtype)
    roofline = None
    if args.roofline_json:
        roofline = load_roofline(args.roofline_json)
        say("ttft", f"roofline from {args.roofline_json}:\n{format_roofline(roofline)}")
    elif not args.no_roofline:
        say("ttft", "measuring the roofline (matmul peak, memory bandwidth)")
        roofline = measure_roofline(dtype=dtype)
        print(format_roofline(roofline), file=sys.stderr, flush=True)
    if roofline is not None and roofline.dtype != dtype:
        say("ttft", f"warning: the roofline was measured in {roofline.dtype}, the sweep runs {dtype}")
    settings = dict(
        ks=args.ks, ls=args.ls, prompt_tokens=args.prompt_tokens, batch=args.batch, dtype=dtype,
        attn_impl=args.attn_impl, repeats=args.repeats, mapper_kind=args.mapper, lora_rank=args.lora_rank,
        worker_prompt_tokens=args.worker_prompt_tokens, new_tokens=args.new_tokens, seed=args.seed,
        warmup=not args.no_warmup, cache_path=resolve_cache_path(args.cache_path, args.attn_impl),
    )
    profile_dir = out / "profile" if args.profile or args.profile_text else None
    profile_paths = ("cache",) * args.profile + ("text",) * args.profile_text
    command = command_line("ttft", args, _OPTIONS, _SWITCHES, arch=arch, dtype=dtype, cache_path=settings["cache_path"],
                           peer_order=args.peer_order if args.torch_peer else None)
    meta = sweep_metadata(cfg, arch=arch, hub=hub, command=command, roofline=roofline,
                          peer=peer["metadata"] if peer else None, **settings)
    harness.describe_run("ttft", arch, cfg, meta, f"{cfg.num_layers} layers, {cfg.num_kv_heads} KV heads x "
                                                  f"{cfg.head_dim}")
    say("ttft", f"times in ms, median of {args.repeats} after a compile call; batch {args.batch}, "
                f"prompt {args.prompt_tokens} tokens; cache path: {settings['cache_path']}")
    rows = run_ttft_sweep(cfg, roofline=roofline, peer_rows=peer["rows"] if peer else None, profile_dir=profile_dir,
                          peer=server, profile_paths=profile_paths,
                          on_row=lambda done: write_json(out / "ttft.json", {**meta, "partial": True}, done), **settings)
    harness.stamp_end(meta)
    meta["partial"] = False
    if server is not None:  # the peer's own file, as `--peer-order first` keeps it
        write_json(out / "ttft_peer.json", server.metadata,
                   [{k: v for k, v in r.items() if k in ("K", "L") or k.startswith("peer_")} for r in rows])
    json_path = write_json(out / "ttft.json", meta, rows)
    say("ttft", f"wrote {json_path}")
    if not args.no_plot:
        png = plot_ttft(meta, rows, out / "ttft.png")
        if png is not None:
            say("ttft", f"wrote {png}")
        if roofline is not None or peer:
            png = plot_ttft_floor(meta, rows, out / "ttft_floor.png")
            if png is not None:
                say("ttft", f"wrote {png}")
    return 0


if __name__ == "__main__":  # python -m benchmarks.ttft ... = psynth bench ttft ...
    sys.exit(harness.main("ttft"))
