"""`psynth bench roofline`: measure a device's matmul peak and memory bandwidth (roofline.json).

Two measurements (pure functions, jitted, `block_until_ready`, median of repeats):

- `measure_matmul_peak`: FLOP/s of square matmuls [n, n] @ [n, n] (2 n^3 FLOPs each), in the
  benchmark's dtype (bfloat16 on GPU, float32 on CPU by default); the best size is kept.
- `measure_bandwidth`: bytes/s of device memory, from an elementwise op over a large array
  (`x + 1`: reads and writes the array, 2 x nbytes) and from a full reduction (`sum(x)`: reads
  it once); the better of the two is kept (weights and KV are mostly read).

The result is a `Roofline` (psynth_jax/measure/roofline.py, with the cost model that turns it into
each path's floor); `bench ttft`, `decode` and `train` measure or read one.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from psynth_jax.cli.common import number
from psynth_jax.measure.roofline import Roofline, load_roofline, write_roofline
from psynth_jax.measure.timing import time_calls

# default sizes: square matmul n, and the bandwidth array in MiB (per platform). 1 GiB on CPU too:
# the floor is for steps that stream the weights from memory (SmolLM2-135M float32: 538 MB), and
# a smaller array can sit in a large last-level cache (the Intel Xeon VM reports 480 MiB of L3,
# where 64 MiB measured 84 GB/s against 42 GB/s from memory)
MATMUL_SIZES = {"cpu": (512, 1024), "gpu": (4096, 8192, 16384), "tpu": (4096, 8192, 16384)}
BANDWIDTH_MIB = {"cpu": 1024, "gpu": 1024, "tpu": 1024}
__all__ = ["Roofline", "load_roofline", "measure_bandwidth", "measure_matmul_peak", "measure_roofline"]


def _device():
    d = jax.devices()[0]
    return d.platform, getattr(d, "device_kind", d.platform)


def default_dtype() -> str:
    """float32 on CPU, bfloat16 on accelerators (as `psynth bench ttft --dtype auto`)."""
    return "float32" if _device()[0] == "cpu" else "bfloat16"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Call fn once (compile), then `repeats` times, each until ready; median seconds."""
    return time_calls(fn, repeats).median_s


def measure_matmul_peak(sizes: Sequence[int] | None = None, *, dtype: str | None = None,
                        repeats: int = 10) -> dict[str, Any]:
    """Best FLOP/s over square matmuls of the given sizes: {"flops_per_s", "n", "dtype", "per_size"}.

    Each size: one jitted `a @ b` (output in the input dtype), 2 n^3 FLOPs per call, median of
    `repeats` calls after a compile call.
    """
    dtype = dtype or default_dtype()
    sizes = tuple(sizes or MATMUL_SIZES.get(_device()[0], MATMUL_SIZES["gpu"]))
    mm = jax.jit(lambda a, b: a @ b)
    per_size = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
        b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
        s = _median_seconds(functools.partial(mm, a, b), repeats)
        per_size[str(n)] = {"median_s": s, "flops_per_s": 2.0 * n ** 3 / s}
        del a, b
    best = max(per_size, key=lambda k: per_size[k]["flops_per_s"])
    return {"flops_per_s": per_size[best]["flops_per_s"], "n": int(best), "dtype": dtype, "repeats": repeats,
            "per_size": per_size}


def measure_bandwidth(mib: float | None = None, *, repeats: int = 10) -> dict[str, Any]:
    """Device memory bytes/s over a float32 array of `mib` MiB: {"bytes_per_s", "copy_bytes_per_s",
    "read_bytes_per_s", "nbytes"}. copy: `x + 1` (reads + writes nbytes); read: `sum(x)` (reads
    nbytes). bytes_per_s is the better of the two."""
    mib = float(mib or BANDWIDTH_MIB.get(_device()[0], BANDWIDTH_MIB["gpu"]))
    n = max(int(mib * 2 ** 20 // 4), 1024)
    nbytes = n * 4
    box = [jnp.ones((n,), jnp.float32)]  # the values do not matter; drawing 1 GiB of normals took ~3 s
    # in place (donated): a fresh output buffer per call would time the allocator (page faults on CPU)
    copy = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    read = jax.jit(lambda v: jnp.sum(v))

    def copy_once():
        box[0] = copy(box[0])
        return box[0]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        copy_s = _median_seconds(copy_once, repeats)
    read_s = _median_seconds(lambda: read(box[0]), repeats)
    box.clear()
    copy_bw, read_bw = 2.0 * nbytes / copy_s, nbytes / read_s
    return {"bytes_per_s": max(copy_bw, read_bw), "copy_bytes_per_s": copy_bw, "read_bytes_per_s": read_bw,
            "nbytes": nbytes, "repeats": repeats}


def measure_roofline(*, dtype: str | None = None, matmul_sizes: Sequence[int] | None = None,
                     bandwidth_mib: float | None = None, repeats: int = 10) -> Roofline:
    """Measure the first device's matmul peak (in `dtype`) and memory bandwidth."""
    platform, kind = _device()
    mm = measure_matmul_peak(matmul_sizes, dtype=dtype, repeats=repeats)
    bw = measure_bandwidth(bandwidth_mib, repeats=repeats)
    gc.collect()
    return Roofline(
        matmul_flops_per_s=mm["flops_per_s"], bandwidth_bytes_per_s=bw["bytes_per_s"], dtype=mm["dtype"],
        platform=platform, device_kind=kind,
        details={"matmul": mm, "bandwidth": bw,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    )


# ------------------------------------------------------------------ CLI
def _mib(text: str) -> str | float:
    """argparse type of --mib: "auto" or a finite size > 0."""
    return text if text == "auto" else number(above=0)(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="matmul dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--sizes", default="auto",
                   help="square matmul sizes n, comma-separated; auto = 512,1024 on CPU, 4096,8192,16384 on GPU")
    p.add_argument("--mib", type=_mib, default="auto", help="bandwidth array size in MiB (> 0); auto = 1024 (beyond any last-level cache)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--out", default="runs/bench", help="output directory (roofline.json)")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = None if args.sizes == "auto" else [int(x) for x in args.sizes.split(",") if x]
        mib = None if args.mib == "auto" else args.mib
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated integers and --mib a number (or auto), "
                         f"got {args.sizes!r}, {args.mib!r}") from None
    dtype = None if args.dtype == "auto" else args.dtype
    r = measure_roofline(dtype=dtype, matmul_sizes=sizes, bandwidth_mib=mib, repeats=args.repeats)
    print(format_roofline(r))
    path = write_roofline(Path(args.out) / "roofline.json", r)
    print(f"[bench roofline] wrote {path}", file=sys.stderr)
    return 0


def format_roofline(r: Roofline) -> str:
    mm, bw = r.details.get("matmul", {}), r.details.get("bandwidth", {})
    sizes = ", ".join(f"n={n}: {v['flops_per_s'] / 1e12:.3g}" for n, v in mm.get("per_size", {}).items())
    lines = [
        f"device          {r.device_kind} [{r.platform}]",
        f"matmul peak     {r.peak_tflops:.4g} TFLOP/s ({r.dtype}, best n={mm.get('n', '?')}; TFLOP/s per size: {sizes})",
        f"bandwidth       {r.bandwidth_gbs:.4g} GB/s (copy {bw.get('copy_bytes_per_s', 0) / 1e9:.4g}, "
        f"read {bw.get('read_bytes_per_s', 0) / 1e9:.4g}; {bw.get('nbytes', 0) / 2 ** 20:.0f} MiB float32)",
        f"ridge point     {r.matmul_flops_per_s / r.bandwidth_bytes_per_s:.1f} FLOP/byte",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.roofline ... = psynth bench roofline ...
    sys.exit(harness.main("roofline"))
