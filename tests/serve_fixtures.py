"""A `psynth serve` stack in the test process: a tiny lively model, the service, uvicorn in a thread.

`lively_model` is tests/tiny_smol.py's random 2-layer model with every weight matrix x10, so that
greedy decoding wanders through the vocabulary instead of repeating one token: equalities of token
sequences then mean something. `running_server` binds 127.0.0.1 on a free port and always stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterator

import jax
import numpy as np

from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.serve.engine import Engine
from psynth_jax.serve.scheduler import Scheduler
from psynth_jax.serve.service import Service
from psynth_jax.serve.store import BranchStore, Origin
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from tiny_smol import random_tiny_smol

MODEL_ID = "tiny-smol"
START_TIMEOUT_S = 60


def lively_model(seed: int = 0):
    model = random_tiny_smol(LoRAConfig(), seed=seed)
    state = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 and x.dtype == np.float32 else x, model.state)
    return dataclasses.replace(model, state=state)


def make_service(synth: ParallelSynthesis, *, slots: int = 4, max_context: int = 512, device_budget: int = 1 << 30,
                 host_budget: int | None = None, default_max_tokens: int = 16) -> Service:
    engine = Engine(synth, slots=slots, max_context=max_context)
    store = BranchStore(device_budget=device_budget, host_budget=host_budget)
    scheduler = Scheduler(engine, store, Origin(model="tiny", adapter="none", handoff=synth.handoff))
    return Service(engine, store, scheduler, model_id=MODEL_ID, family=synth.family,
                   default_max_tokens=default_max_tokens)


@contextlib.contextmanager
def running_server(service: Service, *, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    from psynth_jax.cli.serve import _lifespan
    from psynth_jax.serve.app import create_app

    app = create_app(service, api_key=api_key, max_body_bytes=max_body_bytes, lifespan=_lifespan(service))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not stop"
