"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import sys
import time
import typing
from contextlib import contextmanager
from typing import Iterator

from psynth_jax.interop.embedded import DEFAULT_MODEL


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint: {DEFAULT_MODEL!r} (embedded), a .gguf file, a transformers dir or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--attn-impl", default="xla", choices=["xla", "cudnn", "xla_split", "splash"],
                   help="attention kernel (cudnn: GPU; splash: TPU, Pallas interpret mode elsewhere)")


def add_handoff_arguments(p: argparse.ArgumentParser) -> None:
    """--handoff-convention / --worker-stop-tokens; None when not given, so an explicit choice is
    told apart from the default (trained weights then supply theirs: a release checkpoint selects
    release / eos_only)."""
    from psynth_jax.config.schema import HandoffConvention, WorkerStopTokens  # the config's names; no jax import

    p.add_argument("--handoff-convention", default=None, choices=typing.get_args(HandoffConvention),
                   help="which worker KV the synthesizer receives (default: what the loaded weights were trained "
                        "under, else output_tokens)")
    p.add_argument("--worker-stop-tokens", default=None, choices=typing.get_args(WorkerStopTokens),
                   help="tokens that end a worker: chat end-of-turn markers + eos, or eos only as the release "
                        "(default: what the loaded weights were trained under, else chat)")


@contextmanager
def step(message: str) -> Iterator[None]:
    """Print a progress line with the elapsed time when the step ends."""
    print(f"[psynth] {message} ...", end="", flush=True, file=sys.stderr)
    t0 = time.perf_counter()
    yield
    print(f" done in {time.perf_counter() - t0:.1f}s", flush=True, file=sys.stderr)
