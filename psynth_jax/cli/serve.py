"""`psynth serve`: the OpenAI-style HTTP server (psynth_jax/serve/) on a backbone, default the embedded one.

    psynth serve                                   # SmolLM2-135M on http://127.0.0.1:8000
    psynth serve --model DIR --adapter RUN --port 8080 --api-key KEY

Loads the backbone (with a LoRA: untrained, or the adapter's), builds the synthesizer, the engine
(`--slots` decode slots of `--max-context` cache slots), the branch store and the scheduler, and
runs uvicorn. SIGTERM or Ctrl-C stops accepting connections, lets the requests in flight finish
(up to `--drain-timeout` seconds), then stops the engine and exits 0. FastAPI and uvicorn are the
`serve` extra (`pip install -e '.[serve]'`); the rest of psynth runs without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from psynth_jax.cli.common import (UsageError, add_handoff_arguments, add_model_arguments, check_attn_impl,
                                   make_cli_mesh, positive_int, step)
from psynth_jax.synthesis.prompts import TASK_PROMPTS

API_KEY_ENV = "PSYNTH_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--adapter", default=None,
                   help="trained mapper + LoRA (a `psynth train` run, an exported adapter, or the release's "
                        "checkpoint folder); default: untrained (identity mapper, LoRA B = 0)")
    add_handoff_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every request (also ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model id clients name (default: the --model name)")
    p.add_argument("--slots", type=positive_int, default=16, help="decode slots: requests decoded together")
    p.add_argument("--max-context", type=positive_int, default=2048,
                   help="cache slots per decode slot (prompt + branches + answer), a multiple of 64")
    p.add_argument("--branch-store-mib", type=float, default=512.0,
                   help="device memory for stored branches, MiB; least recently used ones spill to host memory")
    p.add_argument("--branch-host-mib", type=float, default=4096.0,
                   help="host memory for spilled branches, MiB; past it the least recently used are dropped")
    p.add_argument("--family", default="math", choices=sorted(TASK_PROMPTS),
                   help="default task family of synthesis prompts (a request's `family` overrides it)")
    p.add_argument("--default-max-tokens", type=positive_int, default=256,
                   help="max_tokens of a request that gives none (capped by what fits its decode slot)")
    p.add_argument("--prefills-per-round", type=positive_int, default=4,
                   help="new requests prefilled between two decode steps (keeps running requests decoding)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="request body size limit")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for requests in flight before closing them")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from psynth_jax.serve.app import create_app
    except ImportError as err:
        raise UsageError(f"psynth serve needs FastAPI and uvicorn ({err.name} is missing): "
                         "pip install -e '.[serve]'") from None
    check_attn_impl(args.attn_impl, "--attn-impl")
    if args.max_context % 64:
        raise UsageError(f"--max-context must be a multiple of 64, got {args.max_context}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    device_mesh = make_cli_mesh(args.mesh)
    service = build_service(args, device_mesh)
    app = create_app(service, api_key=api_key, max_body_bytes=args.max_body_bytes, lifespan=_lifespan(service))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)
    print(f"psynth serve: {service.model_id} on http://{args.host}:{args.port}/v1 ({args.slots} slots x "
          f"{args.max_context} cache slots{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    server.run()
    return 0


def build_service(args: argparse.Namespace, device_mesh):
    """The model, synthesizer, engine, store and scheduler that `psynth serve` runs (not started)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from psynth_jax.interop.importer import with_adapter
    from psynth_jax.interop.loader import load_model
    from psynth_jax.model.transformer import LoRAConfig
    from psynth_jax.serve.engine import Engine
    from psynth_jax.serve.scheduler import Scheduler
    from psynth_jax.serve.service import Service
    from psynth_jax.serve.store import BranchStore, Origin
    from psynth_jax.synthesis.handoff import Handoff
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    with step(f"loading {args.model} ({args.dtype})"):
        model = load_model(args.model, dtype=args.dtype, lora=LoRAConfig(), mesh=device_mesh)
    handoff = Handoff.from_config(convention=args.handoff_convention, stop_tokens=args.worker_stop_tokens)
    synth = ParallelSynthesis(model, attn_impl=args.attn_impl, handoff=handoff, family=args.family)
    adapter = "none"
    if args.adapter:
        with step(f"loading trained mapper + LoRA from {args.adapter}"):
            synth, _ = with_adapter(synth, args.adapter, convention=args.handoff_convention,
                                    stop_tokens=args.worker_stop_tokens)
        adapter = str(Path(args.adapter).resolve())
    engine = Engine(synth, slots=args.slots, max_context=min(args.max_context, model.cfg.max_position_embeddings))
    mesh = synth.mesh

    def place(tree):
        return jax.device_put(tree) if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

    store = BranchStore(device_budget=int(args.branch_store_mib * 2**20),
                        host_budget=int(args.branch_host_mib * 2**20), place=place)
    name = args.served_model_name or _model_name(args.model)
    scheduler = Scheduler(engine, store, Origin(model=str(model.source), adapter=adapter, handoff=synth.handoff),
                          prefills_per_round=args.prefills_per_round)
    return Service(engine, store, scheduler, model_id=name, family=args.family,
                   default_max_tokens=args.default_max_tokens)


def _model_name(source: str) -> str:
    """The model id clients name: a preset as given, a path by its last component."""
    path = Path(source)
    return path.name if path.exists() else source


def _lifespan(service):
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop(timeout=30)

    return lifespan
