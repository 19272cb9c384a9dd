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
    p.add_argument("--mesh", type=mesh_sizes, default=(1, 1, 1), metavar="DATA,FSDP,TENSOR",
                   help="devices to run on: requests split over DATA, the backbone over FSDP x TENSOR "
                        "(one size may be -1: all remaining devices), e.g. 1,1,8 on a v5e-8; default one device")


def mesh_sizes(text: str) -> tuple[int, int, int]:
    """argparse type: "DATA,FSDP,TENSOR" (ints, at most one -1)."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DATA,FSDP,TENSOR integers, got {text!r}") from None
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes (at most one -1), got {text!r}")
    return sizes  # type: ignore[return-value]


def make_cli_mesh(sizes: tuple[int, int, int]):
    """The (data, fsdp, tensor) Mesh for `--mesh` over this process's first devices (errors name the flag)."""
    from psynth_jax.model.sharding import ShardingError, mesh_of

    try:
        return mesh_of(sizes)
    except ShardingError as err:
        raise ValueError(f"--mesh {','.join(map(str, sizes))}: {err}") from None


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
