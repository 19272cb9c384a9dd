"""Arguments and checks shared by several subcommands.

Checks here run before anything heavy (a model, a dataset) is loaded, and raise UsageError (a
ValueError: `psynth` prints it as one line and exits 2) naming the flag or config field.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from psynth_jax.config.schema import HandoffConvention, WorkerStopTokens
from psynth_jax.formats.output_files import check_parents
from psynth_jax.interop.embedded import DEFAULT_MODEL


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint: {DEFAULT_MODEL!r} (embedded), a .gguf file, a transformers dir or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--attn-impl", default="xla", choices=["xla", "cudnn", "xla_split", "splash", "cpu"],
                   help="attention kernel (cudnn: GPU; splash: TPU, Pallas interpret mode elsewhere; cpu: XLA's, "
                        "with a decode step read from the stacked cache in place by a C++ kernel built on first use)")
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
    p.add_argument("--handoff-convention", default=None, choices=typing.get_args(HandoffConvention),
                   help="which worker KV the synthesizer receives (default: what the loaded weights were trained "
                        "under, else output_tokens)")
    p.add_argument("--worker-stop-tokens", default=None, choices=typing.get_args(WorkerStopTokens),
                   help="tokens that end a worker: chat end-of-turn markers + eos, or eos only as the release "
                        "(default: what the loaded weights were trained under, else chat)")


class UsageError(ValueError):
    """A flag or config value the command cannot run with; the message names it."""


def number(kind: type = float, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None) -> typing.Callable[[str], float]:
    """argparse type for every numeric flag: a finite `kind` (int or float; never nan or inf) in
    the range given (`at_least` <= x, `above` < x, x <= `at_most`); argparse names the flag."""
    parts = ([f">= {at_least:g}"] if at_least is not None else []) + ([f"> {above:g}"] if above is not None else []) \
        + ([f"<= {at_most:g}"] if at_most is not None else [])
    wanted = f"{'an integer' if kind is int else 'a finite number'}{' ' + ' and '.join(parts) if parts else ''}"

    def convert(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not math.isfinite(value) or (at_least is not None and value < at_least) or \
                (above is not None and value <= above) or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse's "invalid <name> value" fallback
    return convert


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return number(int, at_least=1)(text)


def utf8_argument(text: str, what: str) -> str:
    """A command-line text that is UTF-8 (Python hands undecodable bytes of argv over as lone
    surrogates, which the tokenizer refuses with a TypeError naming nothing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start]) - 0xDC00 if 0xDC80 <= ord(text[err.start]) <= 0xDCFF else None
        shown = f" (byte 0x{byte:02x} at character {err.start + 1})" if byte is not None else ""
        raise UsageError(f"{what} is not UTF-8 text{shown}; pass it in the terminal's UTF-8 encoding") from None
    return text


def check_out_dir(path: str | Path, flag: str) -> Path:
    """An output directory the command can create or write into: no existing file at or above it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a directory")
    check_parents(out, flag)
    return out


def check_attn_impl(impl: str, flag: str) -> None:
    """Refuse an attention kernel this machine cannot run, before a model is loaded: "cudnn"
    needs an NVIDIA GPU with cuDNN (tried with one tiny call; splash runs anywhere, in Pallas
    interpret mode off TPU); "cpu" needs the CPU backend and its kernel built (a C++ compiler)."""
    if impl == "cpu":
        import jax

        from psynth_jax.model.kernels import cpu

        if jax.default_backend() != "cpu":
            raise UsageError(f"{flag} cpu is a CPU kernel; this machine runs on {jax.default_backend()}: use xla")
        try:
            cpu.build()
        except cpu.KernelUnavailable as err:
            raise UsageError(f"{flag} cpu: {err}") from None
        return
    if impl != "cudnn":
        return
    import jax
    import jax.numpy as jnp

    q = jnp.zeros((1, 1, 1, 64), jnp.bfloat16)
    try:
        jax.block_until_ready(jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))
    except Exception as err:  # noqa: BLE001 - any failure means this kernel cannot run here
        reason = (str(err).splitlines()[0] if str(err) else type(err).__name__).rstrip(".")
        raise UsageError(f"{flag} cudnn needs an NVIDIA GPU with cuDNN; on this machine ({jax.default_backend()}) "
                         f"it fails: {reason}; use xla (or xla_split, the same layout run by XLA)") from None


@contextmanager
def step(message: str) -> Iterator[None]:
    """Print a progress line with the elapsed time when the step ends."""
    print(f"[psynth] {message} ...", end="", flush=True, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", flush=True, file=sys.stderr)  # the error follows on its own line
        raise
    print(f" done in {time.perf_counter() - t0:.1f}s", flush=True, file=sys.stderr)
