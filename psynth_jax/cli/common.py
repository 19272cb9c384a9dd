"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from psynth_jax.interop.embedded import DEFAULT_MODEL


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint: {DEFAULT_MODEL!r} (embedded), a .gguf file, a transformers dir or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--attn-impl", default="xla", choices=["xla", "cudnn", "xla_split", "splash"],
                   help="attention kernel (cudnn: GPU; splash: TPU, Pallas interpret mode elsewhere)")


@contextmanager
def step(message: str) -> Iterator[None]:
    """Print a progress line with the elapsed time when the step ends."""
    print(f"[psynth] {message} ...", end="", flush=True, file=sys.stderr)
    t0 = time.perf_counter()
    yield
    print(f" done in {time.perf_counter() - t0:.1f}s", flush=True, file=sys.stderr)
