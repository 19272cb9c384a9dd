"""`psynth bench serve`: the HTTP server under concurrent clients on loopback, against one request at a time.

One server (psynth_jax/serve/, uvicorn in a thread of this process, 127.0.0.1) on random weights of
an architecture with the embedded SmolLM2 tokenizer (its chat template; the architecture takes its
vocabulary, 49,152 tokens, as SmolLM2-135M has). K branches of L tokens each are stored once, as text
(`POST /v1/branches`). Then, for each synthesis path (cache: the branches' KV; text: their text in
the prompt), the same `--requests` chat completions over those branches, streamed:

- sequential: one client, one request at a time;
- concurrent: `--clients` clients at once (continuous batching shares the decode steps).

Per (path, phase): TTFT p50 / p99 (request sent -> first content chunk, at the client), decode
tokens/s (completion tokens of all requests / wall time of the phase), requests/s, and the decode
time per token of each request ((last chunk - first chunk) / (tokens - 1)) against its
memory-bandwidth floor at batch 1 (weights + the request's KV, measure/roofline.py). Ratios are
within this one run. Every request and the whole run are bounded in time (`--timeout-s`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import add_common_arguments, base_metadata, command_line, describe_run, resolve_arch, say
from benchmarks.plots import plot_serve
from psynth_jax.measure.roofline import dtype_bytes, kv_bytes, load_roofline, weight_bytes
from psynth_jax.model.loaded import random_model
from psynth_jax.model.transformer import LoRAConfig

MODEL_ID = "bench"
DEFINITIONS = {
    "ttft_ms": "request sent -> first chunk with content, at the client (queueing + prefill + first token), ms",
    "decode_tokens_per_s": "completion tokens of every request of the phase / the phase's wall time",
    "requests_per_s": "requests / the phase's wall time",
    "token_ms": "per request: (last content chunk - first content chunk) / (completion tokens - 1), ms",
    "floor_ms": "memory-bandwidth floor of one batch-1 decode step of that request: (weight bytes + KV bytes of "
                "its cached tokens) / bandwidth (measure/roofline.py)",
    "throughput_vs_sequential": "concurrent decode_tokens_per_s / sequential decode_tokens_per_s, same path",
    "cache_over_text_ttft_p50": "cache path's concurrent TTFT p50 / text path's concurrent TTFT p50",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent phase")
    p.add_argument("--requests", type=int, default=32, help="requests per path and phase")
    p.add_argument("--k", type=int, default=3, help="branches per synthesis")
    p.add_argument("--branch-tokens", type=int, default=128, help="tokens per branch (L)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--slots", type=int, default=16, help="the server's decode slots")
    p.add_argument("--max-context", type=int, default=1024, help="the server's cache slots per decode slot")
    p.add_argument("--timeout-s", type=float, default=900.0, help="bound of the whole run (and of each request)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one engine decode step (self time per XLA op, measure/profile.py) with one live "
                        "slot: over --slots slots, over the first slot of --slots, on 1 slot; against the batch-1 "
                        "bandwidth floor")
    p.add_argument("--roofline-json", default=None, metavar="PATH",
                   help="bandwidth of a `psynth bench roofline` roofline.json for the floors (else none)")
    add_common_arguments(p, name="serve", repeats=1)
    p.set_defaults(arch="smollm2-135m")


_OPTIONS = ("arch", "clients", "requests", "k", "branch_tokens", "max_tokens", "slots", "max_context", "timeout_s",
            "roofline_json", "dtype", "attn_impl", "seed", "out")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.interop.embedded import default_gguf_path
    from psynth_jax.interop.tokenizer import load_tokenizer

    for name in ("clients", "requests", "k", "branch_tokens", "max_tokens", "slots"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cfg, arch, hub = resolve_arch(args.arch)
    dtype = harness.resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(default_gguf_path())
    if cfg.vocab_size != len(tokenizer):  # random weights: the architecture takes the tokenizer's vocabulary
        say("serve", f"{arch}: vocabulary {cfg.vocab_size} -> {len(tokenizer)} (SmolLM2's tokenizer)")
        cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer))
    meta = base_metadata("serve", cfg, arch=arch, hub=hub, dtype=dtype, attn_impl=args.attn_impl,
                         command=command_line("serve", args, _OPTIONS, ("profile",), arch=arch, dtype=dtype), repeats=1,
                         seed=args.seed)
    bandwidth = load_roofline(args.roofline_json).bandwidth_gbs if args.roofline_json else None
    meta.update({k: getattr(args, k) for k in ("clients", "requests", "k", "branch_tokens", "max_tokens", "slots",
                                               "max_context")},
                bandwidth_gbs=bandwidth, definitions=DEFINITIONS, batch=f"1..{args.slots}",
                prompt_tokens=f"K={args.k} x L={args.branch_tokens}")
    describe_run("serve", arch, cfg, meta, f"{args.clients} clients, {args.requests} requests per path and phase")
    lora = LoRAConfig()
    model = dataclasses.replace(random_model(cfg, dtype=dtype, lora=lora, seed=args.seed), tokenizer=tokenizer)
    try:
        rows = asyncio.run(asyncio.wait_for(_measure(args, model), args.timeout_s))
    except TimeoutError:
        raise TimeoutError(f"the run took longer than --timeout-s {args.timeout_s:g} s (a loaded machine? raise it, "
                           "or lower --requests)") from None
    floor = _floor_fn(cfg, dtype, lora, bandwidth)
    for row in rows:
        row.update(floor(row))
    summary = _summary(rows)
    if args.profile:
        meta["decode_step_profiles"] = _profile_steps(model, args, floor)
        for p in meta["decode_step_profiles"]:
            summary[f"step_ms_{p['name']}_1_live"] = round(p["wall_ms"], 2)
            if p.get("over_floor") is not None:
                summary[f"step_over_batch1_floor_{p['name']}"] = round(p["over_floor"], 3)
    meta["summary"] = summary
    for key, value in summary.items():
        say("serve", f"{key}: {value}")
    harness.report("serve", meta, rows, COLUMNS, args, plot_serve)
    return 0


COLUMNS: tuple[harness.Column, ...] = (
    ("path", "path", "{:>5s}"), ("phase", "phase", "{:>10s}"), ("n", "requests", "{:>4d}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:>11.1f}"), ("TTFT p99 ms", "ttft_p99_ms", "{:>11.1f}"),
    ("tok/s", "decode_tokens_per_s", "{:>7.1f}"), ("req/s", "requests_per_s", "{:>6.2f}"),
    ("ms/token", "token_ms_p50", "{:>8.1f}"), ("floor ms", "floor_ms", "{:>8.2f}"), ("x floor", "token_over_floor", "{:>7.2f}x"),
)


async def _measure(args: argparse.Namespace, model) -> list[dict[str, Any]]:
    import httpx

    from psynth_jax.serve.engine import Engine
    from psynth_jax.serve.scheduler import Scheduler
    from psynth_jax.serve.service import Service
    from psynth_jax.serve.store import BranchStore, Origin
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    synth = ParallelSynthesis(model, attn_impl=args.attn_impl)
    engine = Engine(synth, slots=args.slots, max_context=args.max_context)
    store = BranchStore(device_budget=1 << 30)
    scheduler = Scheduler(engine, store, Origin("random", "none", synth.handoff), prefills_per_round=args.slots)
    service = Service(engine, store, scheduler, model_id=MODEL_ID, default_max_tokens=args.max_tokens)
    server, thread, url = _start(service)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s) as http:
            texts = [_branch_text(synth.tok, args.branch_tokens, i) for i in range(args.k)]
            ids, kept = [], 0
            for text in texts:
                r = await http.post("/v1/branches", json={"model": MODEL_ID, "text": text})
                r.raise_for_status()
                ids.append(r.json()["id"])
                kept += r.json()["kept_tokens"]
            say("serve", f"stored K={args.k} branches ({kept} tokens); warming up (compiles)")
            for path in ("cache", "text"):
                await _one(http, _body(path, ids, args, 0))
            rows = []
            for phase, clients in (("sequential", 1), ("concurrent", args.clients)):
                for path in ("cache", "text"):
                    say("serve", f"{phase}: {args.requests} {path}-path requests, {clients} client(s)")
                    rows.append(await _phase(http, path, phase, clients, ids, args, kept))
            return rows
    finally:
        server.should_exit = True
        thread.join(timeout=60)


async def _phase(http, path: str, phase: str, clients: int, ids: list[str], args, kept: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(clients)

    async def gated(i: int) -> dict[str, float]:
        async with gate:
            return await _one(http, _body(path, ids, args, i + 1))

    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(args.requests)))
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] * 1e3 for r in results]
    tokens = sum(r["tokens"] for r in results)
    per_token = [r["token_s"] * 1e3 for r in results if r["token_s"] is not None]
    return {"path": path, "phase": phase, "clients": clients, "requests": len(results), "wall_s": wall,
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99), "ttft_ms": ttft,
            "completion_tokens": tokens, "decode_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "token_ms_p50": _pct(per_token, 50) if per_token else None, "prompt_tokens": results[0]["prompt_tokens"],
            "cached_tokens": kept if path == "cache" else 0}


async def _one(http, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: TTFT, decode time per token, token counts (from the usage chunk)."""
    t0 = time.perf_counter()
    first = last = None
    usage = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    if usage is None or first is None:
        raise RuntimeError("a streamed request ended without content or usage")
    n = usage["completion_tokens"]
    return {"ttft_s": first - t0, "tokens": n, "prompt_tokens": usage["prompt_tokens"],
            "token_s": (last - first) / (n - 1) if n > 1 else None}


def _body(path: str, ids: list[str], args, i: int) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": f"Question {i}: combine the findings."}],
            "branches": ids, "synthesis": path, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def _branch_text(tokenizer, tokens: int, seed: int) -> str:
    """About `tokens` tokens of plain text (numbered findings), cut at a token boundary."""
    words = " ".join(f"finding {seed}.{j}: the value is {(j * 37 + seed) % 1000}." for j in range(tokens))
    return tokenizer.decode(tokenizer.encode(words, add_special_tokens=False)[:tokens])


def _start(service):
    import threading

    import uvicorn

    from psynth_jax.cli.serve import _lifespan
    from psynth_jax.serve.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(service, lifespan=_lifespan(service)), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def _floor_fn(cfg, dtype: str, lora: LoRAConfig, bandwidth: float | None):
    nbytes = dtype_bytes(dtype)

    def floor(row: dict[str, Any]) -> dict[str, Any]:
        if bandwidth is None or row.get("token_ms_p50") is None:
            return {}
        lora_on = row["path"] == "cache"
        wb = weight_bytes(cfg, nbytes, lora_rank=lora.rank if lora_on else 0, lora_targets=lora.targets)
        context = row["cached_tokens"] + row["prompt_tokens"] + row["completion_tokens"] / row["requests"] / 2
        ms = 1e3 * (wb + kv_bytes(cfg, int(context), nbytes)) / (bandwidth * 1e9)
        return {"floor_ms": ms, "token_over_floor": row["token_ms_p50"] / ms}

    return floor


def _profile_steps(model, args: argparse.Namespace, floor) -> list[dict[str, Any]]:
    """One `engine.generate` step with one live slot (the first), each slot --max-context cache slots
    wide: over all --slots slots (a step that does not narrow), over the first slot only (what
    `Engine.step_rows` runs for a lone request), and on a 1-slot engine. Wall time, self time per op
    kind, and the ratio to the batch-1 floor of a request with --max-context cached tokens."""
    import jax.numpy as jnp

    from psynth_jax.measure.profile import profile_jit
    from psynth_jax.serve import engine as eng
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    out = []
    synth = ParallelSynthesis(model, attn_impl=args.attn_impl)
    for slots, rows in dict.fromkeys([(args.slots, None), (args.slots, 1), (1, None)]):
        engine = eng.Engine(synth, slots=slots, max_context=args.max_context)
        live = np.zeros(slots, bool)
        live[0] = True

        def step(params, state, live_rows, rows=rows):
            return eng.generate(model.graphdef, params, state, live_rows, attn_impl=args.attn_impl, rows=rows)

        name = f"{slots}_slots" + ("" if rows is None or slots == 1 else f"_{rows}_row")
        say("serve", f"profiling one decode step: {slots} slot(s) x {args.max_context} cache slots, rows {rows or slots}")
        prof = profile_jit(step, lambda: (model.state, engine.init_decode_state(), jnp.asarray(live)),
                           f"{args.out}/profile_{name}", calls=3, donate_argnums=(1,))
        row = {"name": name, "slots": slots, "rows": rows or slots, "max_context": args.max_context,
               **prof.summary(top=8)}
        batch1 = floor({"path": "cache", "token_ms_p50": prof.wall_ms, "cached_tokens": args.max_context,
                        "prompt_tokens": 0, "completion_tokens": 0, "requests": 1})
        if batch1:
            row.update(floor_ms=batch1["floor_ms"], over_floor=batch1["token_over_floor"])
        out.append(row)
        say("serve", prof.format(top=6))
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    at = {(r["path"], r["phase"]): r for r in rows}
    out = {}
    for path in ("cache", "text"):
        out[f"{path}_throughput_vs_sequential"] = (at[(path, "concurrent")]["decode_tokens_per_s"]
                                                   / at[(path, "sequential")]["decode_tokens_per_s"])
    out["cache_over_text_ttft_p50"] = at[("cache", "concurrent")]["ttft_p50_ms"] / at[("text", "concurrent")]["ttft_p50_ms"]
    out["cache_over_text_ttft_p50_sequential"] = (at[("cache", "sequential")]["ttft_p50_ms"]
                                                  / at[("text", "sequential")]["ttft_p50_ms"])
    seq = at[("cache", "sequential")]
    if seq.get("token_over_floor") is not None:
        out["batch1_decode_over_floor"] = seq["token_over_floor"]
    return {k: round(v, 3) for k, v in out.items()}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


if __name__ == "__main__":  # python -m benchmarks.serve ... = psynth bench serve ...
    sys.exit(harness.main("serve"))
